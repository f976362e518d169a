"""Storage formats behind the same verbs: ``write_atomic``, ``read`` and ``verify``.

- ``manifest``: the pydantic record that marks a stage partition done (written last);
- ``zarr_io``: arrays (statistics, activations, token ids) as zarr v3 directories;
- ``safetensors_io``: weights and factors as safetensors files.
"""
