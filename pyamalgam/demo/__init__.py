"""The paper's experiment (001, §6) as a pipeline, end to end on synthetic (or real) data.

Stages, each cached in the run directory and reused by a later run with the same settings:

1. data: SyntheticScenes train (labelled, for the teachers), unlabelled (for the students) and
   test splits, rendered once and stored as safetensors;
2. teachers: SegNet, DepthNet and NormNet trained with labels (:mod:`pyamalgam.teachers`);
3. TargetNet-2 (seg + depth): block-wise amalgamation (Eq. 6) on unlabelled images, then
   * the Eq. 7 TargetNet (each task branches out where its final block loss is lowest), and
   * Decoder_b1..b5 (every task branches out at decoder block b), all from the same block-wise
     fit, each fine-tuned for the same number of steps;
4. TargetNet-3 offline (Eq. 8: three teachers at once) and online (Eq. 9: TargetNet-2 and NormNet);
5. evaluation of every network on the test split, then :mod:`pyamalgam.report` writes Table 1,
   Table 2 (markdown + JSON) and the figures.

A stage's cache entry carries a key (a hash of everything it depends on, upstream stages
included); a mismatch recomputes it. Files are written atomically, so an interrupted run
restarts from its last finished stage (the block-wise fits even from their last finished block).
"""
from .config import SEED_OFFSETS, DemoConfig, demo_config
from .evaluation import evaluate
from .pipeline import run_demo
from .stages import InMemoryScenes

__all__ = ["DemoConfig", "demo_config", "run_demo", "evaluate", "InMemoryScenes", "SEED_OFFSETS"]
