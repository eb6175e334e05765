"""The --select strategies by name, each `select(search, context) -> Selection`: a choice of one
candidate per layer (selection.search), measured through the shared Search."""

from . import auto, cosine, energy, fixed, hessian, vbmf

STRATEGIES = {"auto": auto.select, "cosine": cosine.select, "hessian": hessian.select, "energy": energy.select,
              "vbmf": vbmf.select, "rank": fixed.select}

__all__ = ["STRATEGIES"]
