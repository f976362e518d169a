"""The DAG, in execution order. One module per stage."""

from stagepipe.engine.stage import Stage
from stagepipe.stages.allocate import AllocateStage
from stagepipe.stages.assemble import AssembleStage
from stagepipe.stages.capture import CaptureStage
from stagepipe.stages.decompose import DecomposeStage
from stagepipe.stages.evaluate import EvaluateStage
from stagepipe.stages.fisher import FisherStage
from stagepipe.stages.refit import RefitStage
from stagepipe.stages.report import ReportStage
from stagepipe.stages.residual import ResidualStage
from stagepipe.stages.sensitivity import SensitivityStage
from stagepipe.stages.snapshot import SnapshotStage
from stagepipe.stages.tokenize import TokenizeStage

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        SnapshotStage(), TokenizeStage(), CaptureStage(), FisherStage(), DecomposeStage(), SensitivityStage(),
        AllocateStage(), ResidualStage(), RefitStage(), AssembleStage(), EvaluateStage(), ReportStage(),
    )
}
