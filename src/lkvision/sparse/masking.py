"""The dynamic-sparse-training driver: :class:`SparseConfig` and :class:`Masking`.

Two modes:

* ``"sw_coarse"`` (ShiftWise, official ``--sparse_type rep_coarse``): per-filter masks of shape
  ``(O, 1, 1, 1)`` on every rep branch of every ShiftWise layer; ``magnitude_sum`` prune,
  ``random_sum`` growth, branch masks shared (copied from branch 0) on every ``sync_gap``-th update.
* ``"slak"`` (SLaK, official ``--sparse_type origin``): elementwise masks on the large-kernel strip
  weights (``only_large_kernel``) or on every 2-D/4-D parameter; magnitude prune; random, gradient or
  momentum growth.

Typical loop (plain or AMP)::

    masking = Masking(model, SparseConfig(mode="sw_coarse", total_steps=N), optimizer=opt)
    masking.init(sample_batch=(x, y))             # SNIP needs one batch
    for x, y in loader:
        loss = ...; scaler.scale(loss).backward()
        stepped = scaler_step(scaler, opt)        # or: opt.step(); stepped = True
        masking.step(stepped)                     # apply masks; prune/grow every `update_every` steps
        opt.zero_grad(set_to_none=True)
    ckpt["masking"] = masking.state_dict()        # restore with masking.load_state_dict(...) instead of init()

Layers are found by duck typing (no import of other lkvision layers):

* a ShiftWise layer is a module with the class attribute ``is_shiftwise = True`` and ``.branches``, an
  ``nn.ModuleList`` of convs with weights ``(R*nk, 1, k, k)``;
* a SLaK large-kernel layer is a module with the class attribute ``is_strip_conv = True``; its masked
  weights are those listed in its optional ``sparse_weight_names`` (names relative to the module), else
  every conv weight inside it with a non-square kernel (the ``M x N`` and ``N x M`` strips; the small
  ``N x N`` conv stays dense, as the official ``large_kernel.LoRA`` name filter does).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .density import densities_from_scores, erk_densities, snip_saliency, uniform_densities
from .rules import growth_signal, magnitude_prune, num_to_remove, random_growth, topk_growth, unit_scores
from .schedule import cosine_prune_rate, is_sync_update, is_update_step

__all__ = [
    "SparseConfig",
    "Masking",
    "scaler_step",
    "is_shiftwise_layer",
    "is_strip_layer",
    "find_shiftwise_layers",
    "strip_weight_names",
]

_MODES = ("sw_coarse", "slak")
_INITS = ("snip", "erk", "uniform", "from_weights")
_PRUNES = ("magnitude", "magnitude_sum")
_GROWTHS = ("random", "random_sum", "gradient", "momentum")
_STATE_VERSION = 1


@dataclass
class SparseConfig:
    """Settings of dynamic sparse training.

    ``sparsity``: fraction of mask units removed (density = 1 - sparsity). ``init``: layer densities
    (``snip`` needs one batch; ``from_weights`` rebuilds masks from the zeros of the current weights, e.g.
    to fine-tune a sparse checkpoint with its pattern frozen). ``prune`` / ``growth``: in ``sw_coarse``
    mode the per-filter ``*_sum`` rules are used, and ``magnitude`` / ``random`` are accepted as their
    aliases (as the official ``main.py`` appends ``_sum``); ``slak`` mode rejects the ``*_sum`` names.
    ``update_every`` (u): prune/grow every u optimizer steps (None or 0: static masks). ``sync_gap``:
    share the rep-branch masks on every ``sync_gap``-th update (None or 0: never). ``prune_rate`` decays
    by cosine to ``prune_rate_min`` over ``total_steps``. ``seed`` drives the dedicated mask generator
    (identical on every rank). ``dense_threshold``: layers whose init density is at least this stay dense.
    ``mask_adam_moments``: also mask Adam's ``exp_avg`` after each step (off = official; SGD momentum is
    always masked). ``broadcast``: broadcast masks from rank 0 when they change under torch.distributed.
    """

    mode: str = "sw_coarse"
    sparsity: float = 0.3
    init: str = "snip"
    prune: str = "magnitude"
    growth: str = "random"
    prune_rate: float = 0.3
    prune_rate_min: float = 0.005
    update_every: int | None = 100
    sync_gap: int | None = 131
    only_large_kernel: bool = True
    total_steps: int | None = None
    seed: int = 0
    dense_threshold: float = 0.99
    erk_power_scale: float = 1.0
    mask_adam_moments: bool = False
    broadcast: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, allowed) -> ValueError:
            return ValueError(f"SparseConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")

        if self.mode not in _MODES:
            raise bad("mode", _MODES)
        if self.init not in _INITS:
            raise bad("init", _INITS)
        if self.prune not in _PRUNES:
            raise bad("prune", _PRUNES)
        if self.growth not in _GROWTHS:
            raise bad("growth", _GROWTHS)
        if self.mode == "slak" and (self.prune.endswith("_sum") or self.growth.endswith("_sum")):
            raise ValueError(
                f"SparseConfig: prune={self.prune!r} / growth={self.growth!r} are the per-filter rules of "
                "mode='sw_coarse'; mode='slak' uses 'magnitude' and 'random'/'gradient'/'momentum'"
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SparseConfig.sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.prune_rate_min <= self.prune_rate <= 1.0:
            raise ValueError(
                f"SparseConfig: need 0 <= prune_rate_min <= prune_rate <= 1, got {self.prune_rate_min}, "
                f"{self.prune_rate}"
            )
        if self.update_every is not None and self.update_every < 0:
            raise ValueError(f"SparseConfig.update_every must be >= 0, got {self.update_every}")
        if self.sync_gap is not None and self.sync_gap < 0:
            raise ValueError(f"SparseConfig.sync_gap must be >= 0, got {self.sync_gap}")
        if self.update_every and not self.total_steps:
            raise ValueError(
                "SparseConfig.total_steps (number of optimizer steps of the run) is required for the cosine "
                "prune-rate decay when update_every > 0"
            )
        if self.mask_adam_moments and self.growth == "momentum":
            raise ValueError("SparseConfig: growth='momentum' needs the unmasked Adam moments; "
                             "set mask_adam_moments=False")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @classmethod
    def from_dict(cls, d: dict) -> SparseConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SparseConfig: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- discovery
def _is_instance_of(m: nn.Module, module: str, cls: str) -> bool:
    """``isinstance(m, module.cls)`` without importing ``module`` (if it is not imported, m is not one)."""
    mod = sys.modules.get(module)
    klass = getattr(mod, cls, None) if mod is not None else None
    return isinstance(klass, type) and isinstance(m, klass)


def is_shiftwise_layer(m: nn.Module) -> bool:
    """A ShiftWise layer: class attribute ``is_shiftwise = True`` (duck typing) or an instance of
    ``lkvision.layers.ShiftWiseConv2d``, with a ``branches`` ModuleList (absent once merged for deploy)."""
    marked = getattr(type(m), "is_shiftwise", False) is True or _is_instance_of(
        m, "lkvision.layers.shiftwise", "ShiftWiseConv2d")
    return marked and isinstance(getattr(m, "branches", None), nn.ModuleList)


def is_strip_layer(m: nn.Module) -> bool:
    """A SLaK large-kernel layer: class attribute ``is_strip_conv = True`` (duck typing) or an instance of
    ``lkvision.layers.StripConv``."""
    return getattr(type(m), "is_strip_conv", False) is True or _is_instance_of(
        m, "lkvision.layers.strip", "StripConv")


def find_shiftwise_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{layer name: [parameter name of branch b's weight, ...]}`` for every ShiftWise layer of ``model``."""
    pname = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[str]] = {}
    for lname, m in model.named_modules():
        if not is_shiftwise_layer(m):
            continue
        names = []
        for b, conv in enumerate(m.branches):
            w = getattr(conv, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 4:
                raise TypeError(f"ShiftWise layer {lname!r}: branch {b} must be a conv with a 4-D weight")
            names.append(pname[id(w)])
        shapes = {tuple(model.get_parameter(n).shape) for n in names}
        if len(shapes) > 1:
            raise ValueError(f"ShiftWise layer {lname!r}: branch weights differ in shape: {sorted(shapes)}")
        if names:
            out[lname] = names
    return out


def strip_weight_names(model: nn.Module) -> list[str]:
    """Parameter names of the large-kernel strip weights of every ``is_strip_conv`` layer of ``model``."""
    pname = {id(p): n for n, p in model.named_parameters()}
    out: list[str] = []
    for lname, m in model.named_modules():
        if not is_strip_layer(m):
            continue
        explicit = getattr(m, "sparse_weight_names", None)
        if explicit is not None:
            for rel in explicit:
                try:
                    p = m.get_parameter(rel)
                except AttributeError as e:
                    raise ValueError(f"strip layer {lname!r}: sparse_weight_names entry {rel!r} is not a "
                                     "parameter") from e
                out.append(pname[id(p)])
            continue
        for sub in m.modules():
            w = getattr(sub, "weight", None)
            if isinstance(sub, nn.Conv2d) and isinstance(w, nn.Parameter) and w.shape[-2] != w.shape[-1]:
                out.append(pname[id(w)])
    return list(dict.fromkeys(out))


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers (parameter names without
    ``module.`` / ``_orig_mod.`` prefixes)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _mask_shape(p: Tensor, coarse: bool) -> tuple[int, ...]:
    return (p.shape[0],) + (1,) * (p.dim() - 1) if coarse else tuple(p.shape)


@dataclass
class _Target:
    """One maskable tensor. ``layer``: unit of density (a ShiftWise layer groups its branches).
    ``group``: SNIP threshold group (ShiftWise filters and elementwise weights are ranked separately)."""

    name: str
    param: nn.Parameter
    coarse: bool
    layer: str
    group: str


# -------------------------------------------------------------------------------------------------- masking
class Masking:
    """Masks, their initialisation and their prune/grow updates for one model.

    Public state: ``masks`` (``{param name: bool mask}``, on the parameter's device, broadcastable to it),
    ``densities`` (init density per masked layer), ``dense_layers`` (layers left dense because their init
    density was >= ``dense_threshold``), ``steps`` (optimizer steps seen), ``updates`` / ``syncs`` (number
    of prune/grow updates and of shared-mask syncs so far), ``generator`` (CPU torch.Generator).
    """

    def __init__(self, model: nn.Module, cfg: SparseConfig, optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(cfg, SparseConfig):
            raise TypeError(f"Masking: cfg must be a SparseConfig, got {type(cfg).__name__}")
        self.model = _unwrap(model)
        self.cfg = cfg
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.masks: dict[str, Tensor] = {}
        self.densities: dict[str, float] = {}
        self.dense_layers: list[str] = []
        self.steps = 0
        self.updates = 0
        self.syncs = 0
        self.initialized = False
        self._targets = self._discover()
        self._layers: dict[str, list[str]] = {}
        for t in self._targets.values():
            self._layers.setdefault(t.layer, []).append(t.name)

    # ------------------------------------------------------------------ discovery of the masked tensors
    def _discover(self) -> dict[str, _Target]:
        cfg, model = self.cfg, self.model
        params = dict(model.named_parameters())
        targets: dict[str, _Target] = {}
        if cfg.mode == "sw_coarse":
            sw = find_shiftwise_layers(model)
            if not sw:
                raise ValueError(
                    "Masking(mode='sw_coarse'): the model has no ShiftWise layer (a module with class attribute "
                    "is_shiftwise = True and a .branches ModuleList)"
                )
            for lname, names in sw.items():
                for n in names:
                    targets[n] = _Target(n, params[n], True, lname, "shiftwise")
            if not cfg.only_large_kernel:
                head = model.get_classifier() if hasattr(model, "get_classifier") else None
                head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
                for mname, m in model.named_modules():
                    if isinstance(m, nn.Linear) and id(m.weight) not in head_ids:
                        n = f"{mname}.weight" if mname else "weight"
                        targets[n] = _Target(n, params[n], False, n, "elementwise")
        else:
            if cfg.only_large_kernel:
                names = strip_weight_names(model)
                if not names:
                    raise ValueError(
                        "Masking(mode='slak', only_large_kernel=True): the model has no large-kernel strip "
                        "layer (a module with class attribute is_strip_conv = True); pass "
                        "only_large_kernel=False to mask every 2-D/4-D parameter"
                    )
            else:
                names = [n for n, p in params.items() if p.dim() in (2, 4)]
            for n in names:
                targets[n] = _Target(n, params[n], False, n, "elementwise")
        frozen = [n for n, t in targets.items() if not t.param.requires_grad]
        for n in frozen:
            del targets[n]
        if not targets:
            raise ValueError("Masking: no trainable parameter to mask")
        return targets

    # ------------------------------------------------------------------------------------------- init
    @property
    def prune_rate(self) -> float:
        """Current prune rate (cosine decay over ``total_steps``)."""
        c = self.cfg
        if not c.total_steps:
            return c.prune_rate
        return cosine_prune_rate(self.steps, c.total_steps, c.prune_rate, c.prune_rate_min)

    def init(
        self,
        sample_batch: tuple[Tensor, Tensor] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Masking:
        """Compute layer densities, draw the initial random masks and apply them.

        Each masked layer keeps exactly ``round(density * units)`` units chosen uniformly at random (the
        official code draws a Bernoulli mask, whose count is only right in expectation).

        ``sample_batch = (inputs, targets)`` and ``loss_fn(logits, targets)`` (default cross-entropy) are
        used by ``init="snip"`` only. Layers whose density reaches ``dense_threshold`` stay dense.
        """
        cfg = self.cfg
        layers = list(self._layers)
        if cfg.init == "from_weights":
            self._init_from_weights()
            return self
        if cfg.init == "uniform":
            dens = uniform_densities(layers, cfg.density)
        elif cfg.init == "erk":
            per = erk_densities({n: tuple(t.param.shape) for n, t in self._targets.items()}, cfg.density,
                                cfg.erk_power_scale)
            dens = {ln: sum(per[n] for n in names) / len(names) for ln, names in self._layers.items()}
        else:
            if sample_batch is None:
                raise ValueError("Masking.init: init='snip' needs sample_batch=(inputs, targets)")
            dens = self._snip_densities(sample_batch, loss_fn)
        dens = self._broadcast_densities(dens)
        self.masks, self.densities, self.dense_layers = {}, {}, []
        for ln in layers:
            d = dens[ln]
            if d >= cfg.dense_threshold:
                self.dense_layers.append(ln)
                continue
            self.densities[ln] = d
            names = self._layers[ln]
            t0 = self._targets[names[0]]
            if d <= 0.0:
                warnings.warn(f"sparse init: layer {ln!r} gets density 0 ({cfg.init}); all of its units are "
                              "pruned and growth cannot revive them", stacklevel=2)
            draw = self._random_mask(_mask_shape(t0.param, t0.coarse), d)
            for n in names:
                self.masks[n] = draw.to(self._targets[n].param.device)
        self.initialized = True
        self.apply_masks()
        self._broadcast_masks()
        return self

    def _random_mask(self, shape: tuple[int, ...], density: float) -> Tensor:
        """Exactly ``round(density * units)`` units on, chosen uniformly with the mask generator."""
        units = math.prod(shape)
        keep = min(max(math.floor(density * units + 0.5), 0), units)
        flat = torch.zeros(units, dtype=torch.bool)
        flat[torch.randperm(units, generator=self.generator)[:keep]] = True
        return flat.view(shape)

    def _snip_densities(self, batch, loss_fn) -> dict[str, float]:
        params = {n: t.param for n, t in self._targets.items()}
        sal = snip_saliency(self.model, params, batch, loss_fn)
        by_group: dict[str, dict[str, Tensor]] = {}
        for ln, names in self._layers.items():
            t0 = self._targets[names[0]]
            parts = []
            for n in names:
                s = sal[n]
                parts.append(s.flatten(1).mean(1) if t0.coarse else s.reshape(-1))  # per-filter mean |w g|
            by_group.setdefault(t0.group, {})[ln] = torch.cat(parts)
        out: dict[str, float] = {}
        for scores in by_group.values():
            out.update(densities_from_scores(scores, self.cfg.density))
        return out

    @torch.no_grad()
    def _init_from_weights(self) -> None:
        self.masks, self.densities, self.dense_layers = {}, {}, []
        for ln, names in self._layers.items():
            for n in names:
                t = self._targets[n]
                nz = t.param.detach() != 0
                m = nz.flatten(1).any(1).view(_mask_shape(t.param, True)) if t.coarse else nz
                self.masks[n] = m
            self.densities[ln] = sum(float(self.masks[n].float().mean()) for n in names) / len(names)
        self.initialized = True
        self.apply_masks()
        self._broadcast_masks()

    # ------------------------------------------------------------------------------------ per step
    @torch.no_grad()
    def apply_masks(self) -> None:
        """``w <- w * mask`` for every masked weight, and the same on SGD ``momentum_buffer`` (and Adam
        ``exp_avg`` with ``mask_adam_moments``) of the attached optimizer."""
        opt = self.optimizer
        for n, m in self.masks.items():
            p = self._targets[n].param
            if m.device != p.device:
                m = self.masks[n] = m.to(p.device)
            p.mul_(m)
            if opt is not None:
                state = opt.state.get(p)
                if state:
                    buf = state.get("momentum_buffer")
                    if isinstance(buf, Tensor):
                        buf.mul_(m)
                    if self.cfg.mask_adam_moments and isinstance(state.get("exp_avg"), Tensor):
                        state["exp_avg"].mul_(m)

    def step(self, optimizer_stepped: bool = True) -> bool:
        """Call after every optimizer step (after ``scaler.step`` under AMP).

        Applies the masks; if the optimizer step really happened (``optimizer_stepped``; False when a
        GradScaler skipped it), advances the step counter and runs the prune/grow update every
        ``update_every`` steps. Returns True when an update ran.
        """
        if not self.initialized:
            raise RuntimeError("Masking.step: call masking.init(...) or masking.load_state_dict(...) first")
        self.apply_masks()
        if not optimizer_stepped:
            return False
        self.steps += 1
        if is_update_step(self.steps, self.cfg.update_every):
            self.update()
            return True
        return False

    # ----------------------------------------------------------------------------------- prune/grow
    def _signal(self, n: str) -> Tensor:
        t = self._targets[n]
        return unit_scores(growth_signal(t.param, self.cfg.growth, self.optimizer, n), t.coarse)

    def _prune_grow(self, mask: Tensor, score: Tensor, signal: Callable[[], Tensor], rate: float) -> Tensor:
        nnz = int(mask.sum())
        new = magnitude_prune(mask, score, num_to_remove(rate, nnz))
        removed = nnz - int(new.sum())
        if self.cfg.growth in ("random", "random_sum"):
            return random_growth(new, math.floor(removed), self.generator)
        return topk_growth(new, signal(), math.floor(removed))

    @torch.no_grad()
    def update(self) -> bool:
        """One prune/grow update (normally called by :meth:`step`). Returns True if it was a sync update."""
        cfg = self.cfg
        rate = self.prune_rate
        sync = cfg.mode == "sw_coarse" and bool(cfg.update_every) and is_sync_update(
            self.steps, cfg.update_every, cfg.sync_gap)
        for names in self._layers.values():
            names = [n for n in names if n in self.masks]
            if not names:
                continue
            coarse = self._targets[names[0]].coarse
            if sync and len(names) > 1:
                score = sum(unit_scores(self._targets[n].param, coarse) for n in names)
                new = self._prune_grow(self.masks[names[0]], score,
                                       lambda names=names: sum(self._signal(n) for n in names), rate)
                for n in names:
                    self.masks[n] = new.clone()
            else:
                for n in names:
                    score = unit_scores(self._targets[n].param, coarse)
                    self.masks[n] = self._prune_grow(self.masks[n], score, lambda n=n: self._signal(n), rate)
        self.updates += 1
        self.syncs += int(sync)
        self.apply_masks()
        self._broadcast_masks()
        return sync

    # ------------------------------------------------------------------------------- distributed
    @staticmethod
    def _dist_device() -> torch.device | None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        if "nccl" in str(dist.get_backend()):  # NCCL (or a mixed "cpu:gloo,cuda:nccl") needs CUDA tensors
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _broadcast_densities(self, dens: dict[str, float]) -> dict[str, float]:
        dev = self._dist_device() if self.cfg.broadcast else None
        if dev is None:
            return dens
        keys = list(dens)
        buf = torch.tensor([dens[k] for k in keys], dtype=torch.float64, device=dev)
        dist.broadcast(buf, src=0)
        return dict(zip(keys, buf.tolist()))

    def _broadcast_masks(self) -> None:
        dev = self._dist_device() if self.cfg.broadcast else None
        if dev is None or not self.masks:
            return
        names = sorted(self.masks)
        flat = torch.cat([self.masks[n].reshape(-1).to(device=dev, dtype=torch.uint8) for n in names])
        dist.broadcast(flat, src=0)
        for n, chunk in zip(names, flat.split([self.masks[n].numel() for n in names])):
            old = self.masks[n]
            self.masks[n] = chunk.view(old.shape).to(device=old.device, dtype=torch.bool)
        self.apply_masks()

    # ---------------------------------------------------------------------------------- reporting
    def stats(self) -> list[dict]:
        """One dict per maskable tensor, in model order.

        Keys: ``name``, ``layer``, ``shape``, ``granularity`` (``"filter"``/``"element"``), ``masked``
        (False for layers left dense), ``units`` / ``active_units`` (mask units, i.e. filters or
        elements), ``numel``, ``nonzero`` (weights allowed by the mask), ``density`` = nonzero / numel,
        ``sparsity`` = 1 - density, ``weight_nonzero`` (weights that are actually non-zero now).
        """
        out = []
        for n, t in self._targets.items():
            p = t.param
            shape = _mask_shape(p, t.coarse)
            units = math.prod(shape)
            m = self.masks.get(n)
            active = units if m is None else int(m.sum())
            nonzero = active * (p.numel() // units)
            out.append(dict(
                name=n, layer=t.layer, shape=tuple(p.shape), granularity="filter" if t.coarse else "element",
                masked=m is not None, units=units, active_units=active, numel=p.numel(), nonzero=nonzero,
                density=nonzero / p.numel(), sparsity=1.0 - nonzero / p.numel(),
                weight_nonzero=int((p.detach() != 0).sum()),
            ))
        return out

    def overall_density(self) -> float:
        """Kept weights / weights over every maskable tensor (dense layers included)."""
        st = self.stats()
        return sum(s["nonzero"] for s in st) / max(sum(s["numel"] for s in st), 1)

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed for a bit-identical continuation: masks (bool, CPU), densities, counters,
        the mask generator's state and the config."""
        return {
            "version": _STATE_VERSION,
            "config": asdict(self.cfg),
            "masks": {n: m.detach().to("cpu", copy=True) for n, m in self.masks.items()},
            "densities": dict(self.densities),
            "dense_layers": list(self.dense_layers),
            "steps": self.steps,
            "updates": self.updates,
            "syncs": self.syncs,
            "rng_state": self.generator.get_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (use instead of :meth:`init` on resume) and re-apply the masks."""
        if not isinstance(sd, dict) or "masks" not in sd:
            raise ValueError("Masking.load_state_dict: not a Masking state dict (no 'masks' key)")
        if sd.get("version") != _STATE_VERSION:
            raise ValueError(f"Masking.load_state_dict: unsupported version {sd.get('version')!r}")
        saved_mode = sd.get("config", {}).get("mode")
        if saved_mode is not None and saved_mode != self.cfg.mode:
            raise ValueError(f"Masking.load_state_dict: checkpoint mode {saved_mode!r} != config mode "
                             f"{self.cfg.mode!r}")
        unknown = sorted(set(sd["masks"]) - set(self._targets))
        if unknown:
            raise ValueError(f"Masking.load_state_dict: masks for parameters this model does not mask: "
                             f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        masks = {}
        for n, m in sd["masks"].items():
            t = self._targets[n]
            want = _mask_shape(t.param, t.coarse)
            if tuple(m.shape) != want:
                raise ValueError(f"Masking.load_state_dict: mask {n!r} has shape {tuple(m.shape)}, "
                                 f"expected {want}")
            masks[n] = m.to(device=t.param.device, dtype=torch.bool)
        self.masks = masks
        self.densities = dict(sd.get("densities", {}))
        self.dense_layers = list(sd.get("dense_layers", []))
        self.steps, self.updates, self.syncs = int(sd["steps"]), int(sd["updates"]), int(sd["syncs"])
        self.generator.set_state(sd["rng_state"])
        self.initialized = True
        self.apply_masks()
        self._broadcast_masks()


def scaler_step(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer); scaler.update()`` and whether the optimizer step really ran.

    A GradScaler skips the step when the gradients hold inf/NaN and then lowers its scale, which is how
    the skip is detected. Without a (enabled) scaler this is ``optimizer.step()`` and returns True.
    """
    if scaler is None or not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before
