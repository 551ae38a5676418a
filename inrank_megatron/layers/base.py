"""What every InRank linear layer has, sharded or not: factor storage, growth state, the spectrum of
its active product, Frobenius decay of that product, rank growth, the stage-1 -> stage-2 cut and
capacity growth.

A layer holds ``A`` (``[slots, in_shard]``) and ``B`` (``[out_shard, slots]``) and, in cumulative mode,
a frozen buffer ``w0`` (``[out_shard, in_shard]``). Which dimension is sharded is the subclass's
business: it passes the slices of the full factors it owns and overrides :meth:`_reduce_r` to combine
per-shard ``R`` factors (TSQR) and :meth:`_reduce_gram` to sum per-shard Gram matrices; the rank
(slot) dimension is never sharded. No torch.distributed here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.core.frobenius import FrobeniusPenalty, gram_dtype
from inrank_megatron.core.growth import GrowthState
from inrank_megatron.core.init import (
    FactorInit,
    dense_start_factors,
    dense_start_role,
    init_factors,
)
from inrank_megatron.core.resize import FactorResize
from inrank_megatron.core.rank_rule import select_cut_rank
from inrank_megatron.core.spectrum import r_factor, spectrum_from_r
from inrank_megatron.core.truncation import truncation_maps


def replace_parameter(old: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    """A new Parameter holding ``data`` with the attributes Megatron hangs on ``old``
    (``tensor_model_parallel``, ``partition_dim``, ``allreduce``, ``sequence_parallel``, ...)."""
    new = torch.nn.Parameter(
        data.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=old.requires_grad
    )
    for key, value in vars(old).items():
        setattr(new, key, value)
    return new


class InRankFactorsMixin:
    """Factor storage and growth for an ``nn.Module`` computing ``y = x (W0 + B A)^T + bias``."""

    def _init_inrank(
        self,
        config: InRankConfig,
        in_features: int,
        out_features: int,
        *,
        in_slice: slice = slice(None),
        out_slice: slice = slice(None),
        params_dtype: torch.dtype = torch.float32,
        device=None,
        layer: Optional[str] = None,
        dense_init: Optional[Callable] = None,
    ) -> None:
        """Draw the full factors (CPU RNG, TP-size independent), keep this rank's shard.

        Args:
            config: InRank settings.
            in_features, out_features: the full (unsharded) shape.
            in_slice: the columns of ``A`` / ``w0`` this shard owns.
            out_slice: the rows of ``B`` / ``w0`` this shard owns.
            params_dtype: parameter dtype.
            device: parameter device (default CPU).
            layer: name for error messages (set from :func:`named_inrank_layers` by the
                growth controller).
            dense_init: the dense layer's init method, which ``inrank.init=spectral`` factorises
                and ``inrank.start=dense`` starts from (megatron's ``init_method``; None:
                ``torch.nn.Linear``'s).
        """
        max_rank = config.check_layer(in_features, out_features, layer=layer)
        self.inrank_config = config
        self.full_in_features = in_features
        self.full_out_features = out_features
        self._inrank_in_slice = in_slice
        self._inrank_out_slice = out_slice
        self._dense_init = dense_init
        if config.start != "low_rank":
            # Stage 1 trains every slot (full_rank) or the dense weight (dense); the cut picks the
            # rank.
            n = min(in_features, out_features)
            self.growth = GrowthState(
                rank=n,
                buffer=0,
                max_rank=n,
                threshold=config.threshold,
                warmup=config.warmup,
                gap=config.gap,
                rule=config.rule,
                layer=layer or "",
            )
        else:
            self.growth = GrowthState(
                rank=config.rank,
                buffer=config.buffer,
                max_rank=max_rank,
                threshold=config.threshold,
                warmup=config.warmup,
                gap=config.gap,
                rule=config.rule,
                layer=layer or "",
            )
        # Efficient mode pre-allocates max_rank slots and only widens the active slice (reference);
        # cumulative mode allocates what is active and grows capacity by doubling.
        slots = self.growth.max_rank if config.mode == "efficient" else self.growth.active_slots
        # The update signal needs B0, A0 at every check: they are drawn again from this seed
        # (k x (in + out) random numbers) rather than kept, so no state, checkpoint or export
        # format changes. Other settings draw from the global stream, as they always have.
        self._init_seed = (
            int(torch.randint(0, 2**62, (1,), device="cpu")) if config.keeps_init else None
        )
        full = self._draw_init(slots)
        self.A = torch.nn.Parameter(full.A[:, in_slice].to(params_dtype).to(device).contiguous())
        self.B = torch.nn.Parameter(full.B[out_slice].to(params_dtype).to(device).contiguous())
        if full.w0 is not None:
            w0 = full.w0[out_slice, in_slice].to(params_dtype).to(device).contiguous()
            self.register_buffer("w0", w0, persistent=True)
        else:
            self.w0 = None
        # Seed of the rows given to new capacity in cumulative mode, drawn with the factors so that
        # every TP rank (same CPU RNG stream) draws the same full rows.
        self._extend_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))

    def _draw_init(self, slots: int) -> FactorInit:
        """The full initial factors of ``slots`` slots (:func:`init_factors`, or
        :func:`dense_start_factors`), from the recorded seed when there is one (the same numbers
        every time), else from the global CPU RNG."""
        config = self.inrank_config
        gen = None if self._init_seed is None else torch.Generator().manual_seed(self._init_seed)
        if config.start == "dense":
            return dense_start_factors(
                self.full_in_features,
                self.full_out_features,
                dense_init=self._dense_init,
                generator=gen,
            )
        return init_factors(
            config.mode,
            self.full_in_features,
            self.full_out_features,
            slots,
            init_scale=config.init_scale,
            generator=gen,
            init=config.init,
            dense_init=self._dense_init,
        )

    @property
    def _dense_role(self) -> str:
        return dense_start_role(self.full_in_features, self.full_out_features)

    def _dense_stage(self) -> bool:
        return self.inrank_config.start == "dense" and self.growth.stage == "growing"

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A0[:k]`` and ``B0[:, :k]``: this shard of the active slots' initial values, drawn again
        from the layer's seed (the ``update`` signal; efficient mode)."""
        if self._init_seed is None:
            raise ValueError(
                f"layer {self.growth.layer}: initial factors are only kept with "
                "inrank.signal=update"
            )
        k = self.active_slots
        # The draw at init had the slots of stage 1's allocation (B's fan-in, and where A's
        # numbers end and B's begin in the stream): draw those again, keep the active ones.
        n = min(self.full_in_features, self.full_out_features)
        full = self._draw_init(
            n
            if self.inrank_config.start != "low_rank"
            else self.inrank_config.layer_max_rank(self.full_in_features, self.full_out_features)
        )
        A0 = full.A[:k, self._inrank_in_slice].to(self.A.dtype).to(self.A.device)
        B0 = full.B[self._inrank_out_slice, :k].to(self.B.dtype).to(self.B.device)
        return A0, B0

    # ---- what the forward pass uses ---------------------------------------------------------

    @property
    def active_slots(self) -> int:
        return self.growth.active_slots

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:k]`` (``[k, in_shard]``) and ``B[:, :k]`` (``[out_shard, k]``), ``k = rank + buffer``."""
        k = self.active_slots
        A, B = self.A[:k], self.B[:, :k]
        if self._dense_stage():
            # Stage 1 of a dense start trains the dense weight alone: the identity factor is read
            # as the constant identity, and `0 * factor` gives it a zero gradient (so every
            # backend sees every parameter used, and AdamW moves it by weight decay only, which
            # the constant ignores). The n x n identity product costs what a dense layer does
            # times (1 + n / max(in, out)).
            if self._dense_role == "B":
                A = torch.eye(k, dtype=A.dtype, device=A.device)[:, self._inrank_in_slice] + 0 * A
            else:
                B = torch.eye(k, dtype=B.dtype, device=B.device)[self._inrank_out_slice] + 0 * B
        return A, B

    # ---- spectrum ----------------------------------------------------------------------------

    def _reduce_r(self, R: torch.Tensor, role: str) -> torch.Tensor:
        """Combine per-shard ``R`` factors of factor ``role`` into the full factor's ``R``.

        Unsharded layers return ``R`` as is; tensor-parallel layers gather over their group.
        """
        return R

    def factor_r(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``R`` factors (``[k, k]``) of the full active ``A^T`` and ``B``."""
        dtype = dtype or self.inrank_config.spectrum_torch_dtype
        A, B = self.active_factors()
        R_A = self._reduce_r(r_factor(A.T, dtype=dtype), "A")
        R_B = self._reduce_r(r_factor(B, dtype=dtype), "B")
        return R_A, R_B

    def update_r(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``R`` factors (``[2k, 2k]``) of ``[A; -A0]^T`` and ``[B, B0]``, whose product
        ``B A - B0 A0`` is the cumulative update of the active slots (the QR route at ``2k``:
        ``2k x 2k`` traffic under TP, never a factor)."""
        dtype = dtype or self.inrank_config.spectrum_torch_dtype
        A, B = self.active_factors()
        A0, B0 = self.initial_factors()
        R_A = self._reduce_r(r_factor(torch.cat([A.detach(), -A0]).T, dtype=dtype), "A")
        R_B = self._reduce_r(r_factor(torch.cat([B.detach(), B0], dim=1), dtype=dtype), "B")
        return R_A, R_B

    def spectrum(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Singular values of what the rank rule reads (``inrank.signal``): the full active
        ``B A``, or its update since init ``B A - B0 A0``; zero-padded to ``min(in, out)``."""
        R_A, R_B = (
            self.update_r(dtype) if self.inrank_config.signal == "update" else self.factor_r(dtype)
        )
        return spectrum_from_r(R_A, R_B, min(self.full_in_features, self.full_out_features))

    # ---- Frobenius decay ---------------------------------------------------------------------

    def _reduce_gram(self, gram: torch.Tensor, role: str) -> torch.Tensor:
        """Sum per-shard Gram matrices (``A A^T`` or ``B^T B``) of factor ``role`` into the full
        factor's. Unsharded layers return ``gram`` as is; tensor-parallel layers all-reduce it."""
        return gram

    def _frobenius_grad_scale(self, role: str) -> float:
        """Multiplier on the penalty's gradient of factor ``role`` on this process: 1, unless
        another process's copy of it is summed in (tensor-parallel layers override this)."""
        return 1.0

    def frobenius_penalty(self, coefficient: float) -> torch.Tensor:
        """``coefficient/2 ||B A||_F^2`` of the active product (:mod:`inrank_megatron.core.frobenius`):
        a scalar whose backward adds ``coefficient (B^T B) A`` to ``A``'s gradient and
        ``coefficient B (A A^T)`` to ``B``'s, with ``k x k`` Gram matrices (reduced over shards)
        and never the ``in x out`` product. The same value on every tensor-parallel rank."""
        A, B = self.active_factors()
        dtype = gram_dtype(A.dtype)
        with torch.no_grad():
            gram_A = self._reduce_gram(A.to(dtype) @ A.to(dtype).T, "A")  # (k, k)
            gram_B = self._reduce_gram(B.to(dtype).T @ B.to(dtype), "B")  # (k, k)
        return FrobeniusPenalty.apply(
            A,
            B,
            gram_A,
            gram_B,
            coefficient,
            self._frobenius_grad_scale("A"),
            self._frobenius_grad_scale("B"),
        )

    # ---- growth, the cut, capacity -----------------------------------------------------------

    @property
    def allocated_slots(self) -> int:
        return self.A.shape[0]

    def set_rank(self, rank: int) -> Optional[FactorResize]:
        """Adopt a rank chosen by the rule. Efficient mode only widens the active slice; cumulative
        mode reallocates (doubling) when the active slots would overflow the allocation."""
        if rank < self.growth.rank:
            raise ValueError(
                f"layer {self.growth.layer}: rank never shrinks "
                f"({self.growth.rank} -> {rank} requested)"
            )
        self.growth.rank = rank
        if self.active_slots <= self.allocated_slots:
            return None
        new_slots = min(max(2 * self.allocated_slots, self.active_slots), self.growth.max_rank)
        return self.extend_capacity(new_slots)

    def extend_capacity(self, slots: int) -> FactorResize:
        """Reallocate to ``slots`` slots keeping the old ones in place. New slots get B = 0 and
        kaiming-uniform rows of A (as at init), so ``B A`` is unchanged."""
        old = {"A": self.A, "B": self.B}
        have = self.allocated_slots
        gen = torch.Generator().manual_seed(self._extend_seed + have)
        rows = init_factors(
            "cumulative",
            self.full_in_features,
            self.full_out_features,
            slots - have,
            init_scale=self.inrank_config.init_scale,
            generator=gen,
        )
        new_rows = rows.A[:, self._inrank_in_slice].to(self.A.dtype)
        self.A = replace_parameter(self.A, torch.cat([self.A.detach(), new_rows.to(self.A.device)]))
        self.B = replace_parameter(
            self.B,
            torch.cat([self.B.detach(), self.B.new_zeros(self.B.shape[0], slots - have)], dim=1),
        )
        return FactorResize(
            self.growth.layer, "extend", have, slots, old, {"A": self.A, "B": self.B}
        )

    def fix_rank(self, rank: int) -> None:
        """The fixed-rank baseline: train at ``rank`` from the start, no growth, no cut.

        Reallocates exactly ``rank`` slots (no buffer, so the layer has the parameters of an InRank
        layer cut at that rank), drawn as efficient mode draws its factors (``inrank.init``:
        kaiming-uniform times ``init_scale`` with B's fan-in its slot count, or spectral at
        ``rank`` slots), full-size from a generator seeded at init by the global CPU RNG, so that
        every TP size and rank draws the same full factors. Call it before the optimizer is
        built.
        """
        n = min(self.full_in_features, self.full_out_features)
        name = self.growth.layer
        if self.inrank_config.mode != "efficient":
            raise ValueError(
                f"layer {name}: a fixed rank needs efficient mode, got {self.inrank_config.mode!r}"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
            raise ValueError(
                f"layer {name}: fixed rank must be an integer in 1..{n} "
                f"(min(in, out)), got {rank!r}"
            )
        gen = torch.Generator().manual_seed(self._extend_seed)
        cfg = self.inrank_config
        full = init_factors(
            "efficient",
            self.full_in_features,
            self.full_out_features,
            rank,
            init_scale=cfg.init_scale,
            generator=gen,
            init=cfg.init,
            dense_init=self._dense_init,
        )
        self.A = replace_parameter(self.A, full.A[:, self._inrank_in_slice])
        self.B = replace_parameter(self.B, full.B[self._inrank_out_slice])
        g = self.growth
        self.growth = GrowthState(
            rank=rank,
            buffer=0,
            max_rank=rank,
            threshold=g.threshold,
            warmup=g.warmup,
            gap=g.gap,
            stage="fixed",
            step=0,
            rule=g.rule,
            layer=name,
        )

    def cut(self, step: int, rank: Optional[int] = None) -> FactorResize:
        """Stage 1 -> stage 2 (spec section 4): truncate the active product to the current rank,
        re-factorise balanced, drop the buffer, fix the rank. Reallocates ``A`` and ``B``.

        A full-rank or dense start (``inrank.start``) first picks the rank:
        :func:`select_cut_rank` on the spectrum the rule reads (``inrank.signal``), capped at
        ``max_rank``. ``rank`` imposes one instead (within the active slots; tools/bench_step.py
        cuts at a planned rank)."""
        if self.growth.stage != "growing":
            raise ValueError(f"layer {self.growth.layer}: already cut (stage {self.growth.stage})")
        config = self.inrank_config
        if rank is None and config.start != "low_rank":
            cap = config.layer_max_rank(self.full_in_features, self.full_out_features)
            rank = select_cut_rank(
                self.spectrum(),
                cap,
                config.threshold,
                rule=config.rule,
                layer=self.growth.layer or None,
            )
        if rank is not None:
            if (
                isinstance(rank, bool)
                or not isinstance(rank, int)
                or not 1 <= rank <= self.active_slots
            ):
                raise ValueError(
                    f"layer {self.growth.layer}: cut rank must be an integer in "
                    f"1..{self.active_slots} (the active slots), got {rank!r}"
                )
            # The other active slots are the buffer that the cut drops.
            self.growth.rank, self.growth.buffer = rank, self.active_slots - rank
        # The SVD of the cut always runs in at least fp32 (spec section 5); fp64 here is cheap (k x k).
        R_A, R_B = self.factor_r(torch.float64)
        maps = truncation_maps(R_A, R_B, self.growth.rank)
        A, B = self.active_factors()
        old = {"A": self.A, "B": self.B}
        old_slots = self.allocated_slots
        self.A = replace_parameter(self.A, maps.P_A @ A.detach().to(torch.float64))
        self.B = replace_parameter(self.B, B.detach().to(torch.float64) @ maps.P_B)
        self.growth.fix(step)
        return FactorResize(
            self.growth.layer,
            "truncate",
            old_slots,
            self.growth.rank,
            old,
            {"A": self.A, "B": self.B},
            maps,
        )

    # ---- state ------------------------------------------------------------------------------

    def inrank_state(self) -> dict:
        """Growth state plus what a reload needs to rebuild the factor shapes."""
        state = {
            "growth": self.growth.state_dict(),
            "allocated_slots": self.allocated_slots,
            "extend_seed": self._extend_seed,
        }
        if self._init_seed is not None:
            state["init_seed"] = self._init_seed
        return state

    def load_inrank_state(self, state: dict) -> None:
        """Restore growth state and reshape (empty) factors to the recorded allocation, so that a
        following ``load_state_dict`` of the factor values fits."""
        self.growth.load_state_dict(state["growth"])
        self._extend_seed = int(state["extend_seed"])
        if self.inrank_config.keeps_init:
            if state.get("init_seed") is None:
                raise ValueError(
                    f"layer {self.growth.layer}: inrank.signal=update needs the "
                    "initial factors' seed, which this checkpoint does not record "
                    "(it was trained with another signal)"
                )
            self._init_seed = int(state["init_seed"])
        slots = int(state["allocated_slots"])
        if slots != self.allocated_slots:
            self.A = replace_parameter(self.A, self.A.new_zeros(slots, self.A.shape[1]))
            self.B = replace_parameter(self.B, self.B.new_zeros(self.B.shape[0], slots))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch loads parameters before extra state; the recorded allocation must come first so
        # that a checkpoint taken after a reallocation (cut, capacity growth) fits.
        state = state_dict.get(prefix + "_extra_state")
        if isinstance(state, dict):
            self.load_inrank_state(state)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self):
        return self.inrank_state()

    def set_extra_state(self, state):
        if state is not None and not isinstance(state, torch.Tensor):
            self.load_inrank_state(state)


def frobenius_penalty(model: torch.nn.Module, coefficient: float) -> Optional[torch.Tensor]:
    """``coefficient/2`` times the sum of ``||B A||_F^2`` over the InRank layers of ``model`` (this
    process's pipeline stage), or None when there is nothing to penalise (``coefficient`` 0, or no
    InRank layer). Collective over each layer's tensor-parallel group."""
    layers = named_inrank_layers(model)
    if not coefficient or not layers:
        return None
    return sum(layer.frobenius_penalty(coefficient) for _, layer in layers)


def named_inrank_layers(modules) -> list:
    """``(name, layer)`` for every InRank layer, named by global transformer-layer number (so names
    agree across pipeline stages), e.g. ``decoder.layers.3.mlp.linear_fc1``."""
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    out = []
    for chunk in modules:
        numbers = {}
        for name, m in chunk.named_modules():
            if hasattr(m, "layer_number") and name.rsplit(".", 1)[-1].isdigit():
                numbers[name] = name.rsplit(".", 1)[0] + f".{m.layer_number - 1}"
        for name, m in chunk.named_modules():
            if isinstance(m, InRankFactorsMixin):
                for local, global_name in numbers.items():
                    if name.startswith(local + "."):
                        name = global_name + name[len(local) :]
                        break
                out.append((name.removeprefix("module."), m))
    return out
