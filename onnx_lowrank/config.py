"""Every option of `convert`, as one typed config: the CLI and the Python API share it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .calibration.data import ImageOptions
from .decompositions import METHODS
from .metrics.quality import METRICS
from .selection.search import Context
from .selection.strategies import STRATEGIES

COSTS = ("macs", "params", "latency")
# onnxruntime's int8 conv kernels (MLAS, u8s8) run a width that is not a multiple of 4 slower than
# the multiple above it. benchmarks/int8_widths.py, a factor chain 32 -> r -> 64 at 28x28, batch 32,
# 1 thread: r = 13 / 14 / 15 took 1.29 / 1.24 / 1.25 ms, r = 16 0.68 ms (r = 8, 24, 32: 0.84-0.87).
INT8_RANK_MULTIPLE = 8

EPS_HELP = ("The largest allowed drop in model quality on new data like the calibration set: the drop's "
            "upper confidence bound (--confidence), measured end to end in onnxruntime on calibration inputs "
            "that no fit and no choice saw, must be within it. For a classifier (3 or more classes), with labels "
            "the drop in top-1 accuracy (0.005 = half a point), without the fraction of samples whose top-1 "
            "class changes; for other outputs, two-class scores included, 1 - R^2 per output channel, averaged "
            "(the worst output counts); or your own --metric.")


@dataclass
class CompressConfig:
    eps: float = 0.005
    metric: str | Callable = "auto"        # auto | accuracy | agreement | r2 | cosine, module:function,
    #                                        path.py:function, or the function (metrics.user.UserMetric)
    select: str = "auto"                   # auto | cosine | hessian | energy | vbmf | rank
    rank: int | None = None                # --select rank: cap every rank at R
    ratio: float | None = None             # --select rank: each layer at this fraction of its cost
    energy: float | None = None            # --select energy: kept output energy per layer
    methods: tuple[str, ...] | None = None  # None: auto (svd, spatial-svd, tucker2)
    cost: str = "macs"                     # macs | params | latency
    rank_multiple: int | None = None       # ranks rounded to multiples of this (None: multiple())
    provider: str = "CPUExecutionProvider"  # --cost latency: where layers are timed
    threads: int = 0                       # ... with this many threads (0: onnxruntime's default)
    latency_batch: int = 1                 # ... at this batch size
    exclude: tuple[str, ...] = ()          # node names or op types left alone
    data_aware: bool = True                # whiten by the input covariance (with calibration data)
    compensate: bool = True                # refit each chain's last step to the original's outputs (compensation/refit.py)
    holdout: float = 0.8                   # share of the calibration set no fit and no choice sees: it decides
    confidence: float = 0.9                # level of the drop's upper bound for new data that eps holds
    verify: bool = True                    # step back and fail (VerificationError) when the held-out check fails
    merge: bool = True                     # merge adjacent linear layers where one costs less than two
    quantize: str | None = None            # "int8": quantize the result too (quantization/int8.py), within the same eps
    fp16: bool = False                     # store weights in float16 (compute stays float32)
    optimize: bool = False                 # write onnxruntime's offline-optimized graph (basic level)
    jobs: int = 1                          # layers decomposed at once, in threads (0: one per CPU)
    finetune_epochs: int = 0               # > 0: fine-tune through PyTorch, and compress further while it fits
    finetune_lr: float = 3e-3              # ... its learning rate (SGD, momentum 0.9)
    iterative: bool = False                # ... layer by layer, most sensitive first (Yang & Liu), epochs per layer
    seed: int = 0
    batch_size: int = 64                   # samples per onnxruntime run, at most (--max-memory may run fewer)
    max_memory: int = 12 * 2**30           # bytes the conversion plans for: run batches, statistics, factors
    image: ImageOptions = field(default_factory=ImageOptions)

    def strategy_context(self, prepared, data, targets: list) -> Context:
        """What --select's strategy reads besides the search: the model, the search part, the
        layers and its options."""
        return Context(prepared, data, targets, self.methods, self.rank, self.ratio, self.energy, self.cost, self.seed)

    def multiple(self) -> tuple[int, str]:
        """What ranks are rounded to, and why: --rank-multiple; else INT8_RANK_MULTIPLE with
        --quantize; else, where the cost is speed (MACs, latency), the block of channels
        onnxruntime's convs run in on this machine (runtime.widths: measured once, cached); 1 for
        --cost params (size, whatever the speed)."""
        if self.rank_multiple is not None:
            return self.rank_multiple, "--rank-multiple"
        if self.quantize is not None:
            return INT8_RANK_MULTIPLE, "int8 kernels run widths in multiples of 4, best of 8 (docs/quantization.md)"
        if self.cost == "params":
            return 1, "--cost params: the size, whatever the speed"
        from .runtime.widths import fast_block

        block = fast_block(self.provider, self.threads)
        return block, f"measured: {self.provider} convs here run widths in blocks of {block} channels"

    def validate(self) -> None:
        """Raise ValueError naming the rule and the value received."""
        if not 0 <= self.eps < 1:
            raise ValueError(f"--eps is a quality drop in [0, 1); got {self.eps}")
        user = callable(self.metric) or (isinstance(self.metric, str) and ":" in self.metric)
        if not user and self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, module:function or path.py:function; "
                             f"got {self.metric!r}")
        if self.select not in STRATEGIES:
            raise ValueError(f"--select must be one of {', '.join(STRATEGIES)}; got {self.select!r}")
        if self.cost not in COSTS:
            raise ValueError(f"--cost must be one of {', '.join(COSTS)}; got {self.cost!r}")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise ValueError(f"--rank-multiple must be at least 1; got {self.rank_multiple}")
        if self.jobs < 0:
            raise ValueError(f"--jobs must be >= 0; got {self.jobs}")
        if self.threads < 0 or self.latency_batch < 1:
            raise ValueError(f"--threads must be >= 0 and --latency-batch >= 1; got {self.threads}, {self.latency_batch}")
        if self.cost == "latency" or self.provider != "CPUExecutionProvider":  # what is timed (widths too)
            from .runtime.sessions import require_provider

            require_provider(self.provider)
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in METHODS]
            if unknown or not self.methods:
                raise ValueError(f"--methods takes auto or names from {', '.join(METHODS)}; got {', '.join(unknown) or 'nothing'}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank must be at least 1; got {self.rank}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"--ratio is a fraction of each layer's cost in (0, 1]; got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"--energy is a share in (0, 1]; got {self.energy}")
        if (self.rank is not None or self.ratio is not None) and self.select != "rank":
            raise ValueError("--rank and --ratio go with --select rank")
        if self.energy is not None and self.select != "energy":
            raise ValueError("--energy goes with --select energy")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout is a share in (0, 1); got {self.holdout}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"--confidence is a level in [0.5, 1); got {self.confidence}")
        if self.max_memory < 2**28:
            raise ValueError(f"--max-memory must be at least 256M; got {self.max_memory} bytes")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1; got {self.batch_size}")
        if self.finetune_epochs < 0 or not self.finetune_lr > 0:
            raise ValueError(f"--finetune-epochs must be >= 0 and --finetune-lr positive; got "
                             f"{self.finetune_epochs}, {self.finetune_lr}")
        if self.quantize is not None:
            from .quantization.int8 import MODES

            if self.quantize not in MODES:
                raise ValueError(f"--quantize must be one of {', '.join(MODES)}; got {self.quantize!r}")
            clash = [flag for flag, on in (("--fp16", self.fp16), ("--optimize", self.optimize),
                                           ("--finetune-epochs", self.finetune_epochs)) if on]
            if clash:
                raise ValueError(f"--quantize does not go with {clash[0]} yet: the model is quantized last, "
                                 "as it is written, and that option changes it in float")
        if self.iterative and not self.finetune_epochs:
            raise ValueError("--iterative is a way of fine-tuning: give --finetune-epochs too")
        if self.finetune_epochs and self.cost == "latency":
            raise ValueError("--finetune-epochs with --cost latency is not supported yet: the rounds compare MACs")
        if self.finetune_epochs or self.select == "hessian":  # the torch extra: say so before any work
            from .bridge.deps import require_torch

            require_torch()
