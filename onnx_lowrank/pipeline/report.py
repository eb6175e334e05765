"""The report of a conversion: per layer and for the whole model, as JSON with stable keys, as a
table, and as plots."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..errors import OutputError
from ..selection.search import TracePoint


@dataclass
class LayerReport:
    name: str
    op_type: str
    method: str | None          # None: kept as it was
    ranks: list[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    error: float                # relative output error on the captured inputs
    reason: str
    latency_before: float | None = None  # --cost latency: seconds per run of the layer's micro-model
    latency_after: float | None = None
    precision: str | None = None         # --quantize: int8 or float (Report.quantization says why)


@dataclass
class Report:
    eps: float
    metric: str
    select: str
    cost: str
    data_aware: bool
    calibration: dict
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    file_size_before: int = 0
    file_size_after: int = 0
    quality_before: float = 0.0   # on the check_samples
    quality_after: float = 0.0
    # what --eps bounds: the held-out part of the calibration set (check_samples of them), which no
    # fitting (statistics, compensation, fine-tuning) and no choice (search) touched, decides
    drop: float = 0.0             # the drop measured there
    bound: float = 0.0            # its upper confidence bound for new data from the same distribution
    #                               (infinite, null in JSON: too few groups to bound anything)
    confidence: float = 0.0       # at this level (one-sided): --confidence, or lower where the held-out
    #                               part is too small to bound eps at it (warnings say so)
    bound_method: str = ""        # "score" (paired counts) or "bootstrap"
    groups: int | None = None     # groups the held-out samples came from (None: taken as independent)
    check_samples: int = 0
    resolution: str = ""          # what the check can resolve ("500 held-out samples: one changed sample is ...")
    tested: int = 0               # models of the back-off path measured on the held-out part
    rank_multiple: int = 1        # every rank a multiple of it ...
    rank_multiple_why: str = ""   # ... for this reason (CompressConfig.multiple)
    search_drop: float = 0.0
    backed_off: int = 0           # steps taken back along the path because the bound exceeded eps
    latency_before: float | None = None  # --cost latency: seconds per run of the whole model, measured
    latency_after: float | None = None   # (the two models in turn) at --latency-batch
    timings: dict = field(default_factory=dict)
    trace: list[TracePoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # --finetune-epochs: one entry per round: round (what it tried), search_eps (the drop selection
    # was given; null for raised ranks), mac_ratio, drop_before, drop_after (null: the fine-tune
    # diverged) and bound_after (its upper confidence bound, what must be within eps), losses,
    # lr (the rate it ended at), stopped (before its epochs), processes
    finetune: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # max_memory, statistics_bytes, peak_rss_bytes
    # --quantize: mode, float_drop (the same choice unquantized, on the check samples),
    # float_file_size, int8_layers (how many), float_layers (name -> why), unfused (quantized ops
    # onnxruntime would run in float)
    quantization: dict = field(default_factory=dict)

    @property
    def mac_ratio(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else 1.0

    @property
    def param_ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else 1.0

    def how_run(self) -> str:
        """One line: the inputs (declared shape, which dims are static), the batch the model ran
        in, and the memory the statistics took."""
        inputs = "; ".join(f"{name} {describe_input(spec)}" for name, spec in self.calibration["inputs"].items())
        line = f"inputs: {inputs}"
        if "run_batch" in self.calibration:
            line += f"; runs of {self.calibration['run_batch']} sample(s)"
        m = self.memory
        if "statistics_bytes" in m:
            line += (f"; layer statistics {m['statistics_bytes'] / 2**20:,.0f} MiB of --max-memory "
                     f"{m['max_memory'] / 2**30:.1f} GiB")
        if "peak_rss_bytes" in m:
            line += f"; peak RSS {m['peak_rss_bytes'] / 2**20:,.0f} MiB"
        return line

    def promise(self) -> str:
        """What the written model's bound says, in one line."""
        source = (f"{self.groups} groups" if self.groups is not None else "samples taken as independent")
        return (f"{self.metric} drop at most {self.bound:.4f} on new data at confidence {self.confidence:g} "
                f"(eps {self.eps:g}; {self.check_samples} held-out samples, {source})")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mac_ratio"] = self.mac_ratio
        if not math.isfinite(self.bound):  # too few groups to bound anything: JSON has no Infinity
            data["bound"] = None
        data["param_ratio"] = self.param_ratio
        data["eps_meaning"] = ("largest allowed quality drop (see metric) for new inputs from the calibration "
                               "set's distribution: `bound`, the upper confidence bound at `confidence` of the drop "
                               "measured in onnxruntime on the held-out part, which no fitting and no choice saw, "
                               "is within eps")
        return data

    def write_json(self, path: str | Path) -> None:
        """Atomically: a temporary file next to `path`, renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):  # the folder may not even exist
                tmp.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write the report: {e.strerror or e}") from None

    def tables(self) -> list[Table]:
        timed = any(r.latency_before is not None for r in self.layers)
        quantized = bool(self.quantization)
        floats = self.quantization.get("float_layers", {})
        layers = Table(title="layers")
        for col in ("layer", "op", "method", "ranks", "params", "MACs") + (("latency (ms)",) if timed else ()) + (
                ("precision",) if quantized else ()) + ("error", "why"):
            layers.add_column(col, overflow="fold")
        for r in self.layers:
            latency = (f"{1e3 * r.latency_before:.3f} -> {1e3 * r.latency_after:.3f}",) if timed else ()
            precision = (r.precision or "",) if quantized else ()
            why = r.reason + (f"; {floats[r.name]}" if r.name in floats else "")
            layers.add_row(r.name, r.op_type, r.method or "kept", ",".join(map(str, r.ranks)),
                           f"{r.params_before:,} -> {r.params_after:,}", f"{r.macs_before:,} -> {r.macs_after:,}",
                           *latency, *precision, f"{r.error:.3f}", why)
        for s in self.skipped:
            precision = (s.get("precision", ""),) if quantized else ()
            why = s["reason"] + (f"; {floats[s['name']]}" if s["name"] in floats else "")
            layers.add_row(s["name"], s["op_type"], "skipped", "", "", "", *([""] if timed else []), *precision, "",
                           why)
        whole = Table(title="model")
        for col in ("", "before", "after", "ratio"):
            whole.add_column(col, justify="right")
        whole.add_row("parameters", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.param_ratio:.2f}x")
        whole.add_row("MACs / sample", f"{self.macs_before:,}", f"{self.macs_after:,}", f"{self.mac_ratio:.2f}x")
        whole.add_row("file size", f"{self.file_size_before:,} B", f"{self.file_size_after:,} B",
                      f"{self.file_size_before / max(self.file_size_after, 1):.2f}x")
        if self.latency_before is not None:
            whole.add_row("latency / run", f"{1e3 * self.latency_before:.3f} ms", f"{1e3 * self.latency_after:.3f} ms",
                          f"{self.latency_before / self.latency_after:.2f}x")
        if quantized:
            q = self.quantization
            whole.add_row("file size, float", f"{self.file_size_before:,} B", f"{q['float_file_size']:,} B",
                          f"{self.file_size_before / max(q['float_file_size'], 1):.2f}x")
            whole.add_row(f"{self.metric} drop, float", "", "", f"drop {q['float_drop']:.4f}")
        whole.add_row(f"{self.metric} ({self.check_samples} held-out)", f"{self.quality_before:.4f}",
                      f"{self.quality_after:.4f}", f"drop {self.drop:.4f}, at most {self.bound:.4f}")
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        whole.caption = (f"{self.promise()}\nsearch-part drop {self.search_drop:.4f}; {self.resolution}\n"
                         f"ranks in multiples of {self.rank_multiple} ({self.rank_multiple_why})\ntime: {timing}")
        if quantized:
            whole.caption += (f"\n{self.quantization['mode']}: {self.quantization['int8_layers']} layer(s) int8, "
                              f"{len(floats)} kept in float")
        if self.calibration.get("inputs"):
            whole.caption += "\n" + escape(self.how_run())  # [..] of the shapes is not markup
        if not self.finetune:
            return [layers, whole]
        rounds = Table(title="fine-tuning rounds (held-out drop before and after each fine-tune)")
        for col in ("round", "MACs", "drop before", "drop after", "its bound", f"bound within eps {self.eps}"):
            rounds.add_column(col, justify="right")
        for r in self.finetune:
            after = r["drop_after"]  # None: the fine-tune diverged
            rounds.add_row(r["round"], f"{r['mac_ratio']:.2f}x", f"{r['drop_before']:.4f}",
                           "diverged" if after is None else f"{after:.4f}",
                           "" if after is None else f"{r['bound_after']:.4f}",
                           "yes" if after is not None and r["bound_after"] <= self.eps else "no")
        return [layers, rounds, whole]

    def plots(self, folder: str | Path) -> list[Path]:
        """trade_off.png: each model the search measured, its cost ratio against its measured
        drop, the eps line and the chosen point; layers.png: per layer, the compression chosen
        against the layer's output error. All or nothing: on a failure, what was written (the
        folder too, if made here) is removed and OutputError raised."""
        folder = Path(folder)
        made = not folder.exists()
        written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._plot(folder, written)
        except OSError as e:
            for path in written:
                path.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise OutputError(f"{folder}: cannot write the plots: {e.strerror or e}") from None
        return written

    def _plot(self, folder: Path, written: list[Path]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        top = max(4 * self.eps, 2 * self.search_drop, 1e-3)  # far-off failures would hide the budget
        within = [t for t in self.trace if t.within]
        over = [t for t in self.trace if not t.within and t.drop <= top]
        beyond = [t for t in self.trace if t.drop > top]
        ax.scatter([t.cost_ratio for t in within], [t.drop for t in within], c="tab:green", label="within eps")
        ax.scatter([t.cost_ratio for t in over], [t.drop for t in over], c="tab:red", marker="x", label="over eps")
        if beyond:
            ax.scatter([t.cost_ratio for t in beyond], [top] * len(beyond), c="tab:red", marker="^",
                       label=f"drop > {top:.3g} (drawn at the top)")
        ax.axhline(self.eps, color="gray", linestyle="--", label=f"eps = {self.eps}")
        ax.set_xscale("log")
        ax.set_ylim(min(0.0, min((t.drop for t in self.trace), default=0.0)) - 0.05 * top, top * 1.08)
        ratio = self.mac_ratio if self.cost == "macs" else self.param_ratio
        ax.scatter([ratio], [self.search_drop], s=160, facecolors="none", edgecolors="black", label="chosen")
        ax.set_xlabel(f"{'MAC' if self.cost == 'macs' else 'parameter'} reduction (x)")
        ax.set_ylabel(f"{self.metric} drop on the search set")
        ax.set_title(f"--select {self.select}: models measured during the search")
        ax.legend(loc="upper left")
        fig.tight_layout()
        written.append(folder / "trade_off.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in self.layers:
            ratio = r.macs_before / max(r.macs_after, 1) if self.cost == "macs" else r.params_before / max(r.params_after, 1)
            ax.scatter(r.error, ratio, c="tab:blue" if r.method else "tab:gray")
            ax.annotate(r.name.split("/")[-2] if "/" in r.name else r.name, (r.error, ratio), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("layer output error on its captured inputs (relative)")
        ax.set_ylabel("layer reduction (x)")
        ax.set_title("per layer: compression chosen vs error")
        fig.tight_layout()
        written.append(folder / "layers.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)


def describe_input(spec: dict) -> str:
    """'[?, 3, 224, 224] (dims 1-3 static), samples along axis 0' from calibration.input_layout's entry."""
    dims = ", ".join(str(d) for d in spec["declared"])
    static = [i for i, s in enumerate(spec["static"]) if s]
    which = ("all static" if len(static) == len(spec["static"]) else "none static" if not static
             else "static: dim " + ",".join(map(str, static)))
    return f"[{dims}] ({which}), {spec['given']}"
