"""Storage formats behind the same verbs, ``write_atomic`` and ``read``:

- ``manifest``: the pydantic record that marks a stage partition done (written last; ``verify``
  checks a finished directory against it);
- ``zarr_io``: arrays (statistics, activations, token ids) as zarr v3 directories;
- ``safetensors_io``: weights and factors as safetensors files;
- ``json_io``: small JSON documents (markers, checkpoint metadata).
"""
