"""Presets and configurations of ``benchmarks/quality.py`` (see its docstring for the protocol).

A preset fixes everything that must be equal across configurations: data, model, steps, batch,
optimiser, evaluation checkpoints, evaluation sampler and sample count, and the affinity
warm-up. A configuration only changes the loss weighting / clustering / MTL method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # data + model (identical for every configuration)
    num_images: int
    image_size: int
    model: str
    model_config: dict
    T: int
    # optimisation (identical for every configuration)
    eval_steps: tuple          # evaluate at these steps; the last one is the training length
    batch_size: int
    lr: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    # evaluation (identical for every configuration)
    num_eval: int              # generated samples = held-out reference images
    sample_steps: int          # DDIM steps (eta = 0) of the evaluation sampler
    # affinity warm-up (vanilla checkpoint at affinity_step, then ant_core.affinity)
    affinity_step: int
    affinity_M: int
    affinity_d: int
    affinity_batches: int
    affinity_batch_size: int
    # ANT
    k: int = 5
    prediction: str = "eps"    # what the model predicts (the trainer's ``prediction``)
    # run defaults (default_*): the CLI overrides them and they do not change a result, so an
    # output folder's settings check ignores them
    default_device: str = "cpu"
    default_threads: int = 0   # 0: leave torch's default
    default_jobs: int = 1      # runs at a time (worker processes)
    #: how the gradient methods (PCGrad, Nash-MTL) get their per-task gradients: the trainer's
    #: ``engine``. A run default like the device: the same gradients, computed faster or slower
    default_engine: str = "autograd"

    @property
    def steps(self) -> int:
        return int(self.eval_steps[-1])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["eval_steps"] = list(self.eval_steps)
        out["steps"] = self.steps
        return out


PRESETS = {
    "smoke": Preset(
        name="smoke", description="seconds; for the test suite only (numbers mean nothing)",
        num_images=48, image_size=8, model="dit",
        model_config={"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}, T=100,
        eval_steps=(2, 4), batch_size=8, lr=2e-3, warmup_steps=2, grad_clip=1.0,
        ema_decay=0.9, num_eval=16, sample_steps=3,
        affinity_step=2, affinity_M=10, affinity_d=256, affinity_batches=1,
        affinity_batch_size=8, default_threads=1),
    "cpu": Preset(
        name="cpu", description="about 45 minutes on a 2-core CPU machine (estimate in the "
        "docstring of quality.py)",
        num_images=2000, image_size=16, model="dit-tiny", model_config={}, T=1000,
        eval_steps=(200, 400, 800, 1200), batch_size=64, lr=2e-3, warmup_steps=20,
        grad_clip=1.0, ema_decay=0.995, num_eval=256, sample_steps=25,
        affinity_step=200, affinity_M=50, affinity_d=4096, affinity_batches=4,
        affinity_batch_size=64, default_threads=1),
    "gpu": Preset(
        name="gpu", description="about 8 minutes on one H100 with 16 host cores, 8 runs at a "
        "time (measured: its 24 runs in 271 s + 161 s; the docstring of quality.py)",
        num_images=5000, image_size=16, model="dit",
        model_config={"patch_size": 2, "hidden_size": 192, "depth": 6, "num_heads": 6},
        T=1000, eval_steps=(250, 500, 1000), batch_size=128, lr=1e-3, warmup_steps=50,
        grad_clip=1.0, ema_decay=0.998, num_eval=1000, sample_steps=50,
        affinity_step=250, affinity_M=100, affinity_d=16384, affinity_batches=4,
        affinity_batch_size=128, default_device="cuda", default_threads=2, default_jobs=8,
        default_engine="one-backward"),
}


#: the cpu preset trained 3.3x longer: everything else equal, so only length and EMA differ
PRESETS["cpu-long"] = replace(
    PRESETS["cpu"], name="cpu-long", description="the cpu preset trained 3.3x longer (4000 "
    "steps, EMA 0.999): does ANT's early lead survive? About 5 minutes per run on one core",
    eval_steps=(500, 1000, 2000, 4000), ema_decay=0.999, affinity_step=500)
#: cpu-long trained twice as long again (8000 steps, same EMA): only the length differs
PRESETS["cpu-8k"] = replace(
    PRESETS["cpu-long"], name="cpu-8k", description="the cpu-long preset trained 2x longer "
    "(8000 steps): about 10 minutes per vanilla run and 30 per PCGrad run on one core",
    eval_steps=(1000, 2000, 4000, 8000), affinity_step=1000)
#: the cpu preset with a larger DiT (hidden 192, depth 6: 4.2 M parameters vs 0.73 M)
PRESETS["cpu-wide"] = replace(
    PRESETS["cpu"], name="cpu-wide", description="the cpu preset with a larger DiT (hidden 192, "
    "depth 6, 4.2 M parameters): does ANT need capacity to show? 5-8 minutes per run on one "
    "core", model="dit", model_config={"patch_size": 4, "hidden_size": 192, "depth": 6,
                                          "num_heads": 6})


#: the cpu preset with v-prediction: UW's weights follow 1 / L_k, and the per-cluster losses are
#: far less unequal across noise levels when the model predicts v than when it predicts eps
PRESETS["cpu-v"] = replace(
    PRESETS["cpu"], name="cpu-v", description="the cpu preset with v-prediction (less unequal "
    "per-cluster losses for UW to reweight); about 45 minutes on 2 cores", prediction="v")
#: the cpu preset with x0-prediction: the per-cluster losses are unequal the other way round
#: (large at high noise), so UW's 1 / L_k weights favour the low-noise clusters
PRESETS["cpu-x0"] = replace(
    PRESETS["cpu"], name="cpu-x0", description="the cpu preset with x0-prediction (UW's 1 / L_k "
    "weights then favour low noise); about 45 minutes on 2 cores", prediction="x0")


#: configuration name -> (label, TrainConfig overrides). Order: vanilla first (it is the
#: baseline and its early checkpoint seeds the affinity estimate).
CONFIGS = {
    "vanilla": ("vanilla (uniform t, plain MSE)", dict(method="vanilla")),
    "min_snr": ("Min-SNR-5", dict(method="vanilla", weighting="min_snr", min_snr_gamma=5.0)),
    "uw_timestep": ("ANT-UW timestep", dict(method="uw", objective="timestep")),
    "uw_log_snr": ("ANT-UW log-SNR", dict(method="uw", objective="log_snr")),
    "uw_affinity": ("ANT-UW affinity", dict(method="uw", objective="affinity")),
    "nashmtl_log_snr": ("ANT-Nash-MTL log-SNR", dict(
        method="nashmtl", objective="log_snr", method_config={"update_weights_every": 25})),
    "pcgrad_log_snr": ("ANT-PCGrad log-SNR", dict(method="pcgrad", objective="log_snr")),
    "famo_log_snr": ("ANT-FAMO log-SNR", dict(method="famo", objective="log_snr")),
    # ablations (ABLATIONS): what do the clusters do without a method, or with a slower UW?
    "ew_log_snr": ("ANT-EW log-SNR (stratified t, equal weights)", dict(
        method="ew", objective="log_snr")),
    "uw_log_snr_slow": ("ANT-UW log-SNR, log-variance lr 0.0025", dict(
        method="uw", objective="log_snr", uw_lr=0.0025)),
    # a related baseline: EDM2's continuous uncertainty weighting, uniform t, no clusters
    "edm2": ("EDM2 continuous uncertainty (uniform t)", dict(method="vanilla", weighting="edm2")),
}
#: run only when named in --configs
ABLATIONS = ("ew_log_snr", "uw_log_snr_slow", "edm2")
#: the default grid: the configurations the paper compares
GRID = tuple(name for name in CONFIGS if name not in ABLATIONS)

#: configurations that are not ANT (no verdict line "ANT-..."; still compared with vanilla)
BASELINES = ("vanilla", "min_snr", "edm2")
