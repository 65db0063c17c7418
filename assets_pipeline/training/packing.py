"""Packed LoRA: the adapters of several concepts trained in one process over one frozen base model.

Each row of a batch belongs to one concept and goes through that concept's adapter only. PEFT cannot do this
while training: its per-row ``adapter_names`` forward is inference-only (it refuses mixed-adapter batches in
training mode), and its active adapter is one per layer, not per row. So the pack has its own LoRA layer,
:class:`PackedLoraLinear`, small enough to test against PEFT's LoRA layer output for output and gradient for
gradient (tests/test_packing.py):

    y = base(x) + scaling[idx] * ((x @ A[idx]^T) @ B[idx]^T)

with ``idx`` the adapter index of each row. The N adapters' ``A`` (r, in) and ``B`` (out, r) are stacked
(``torch.stack``) and gathered per row, then applied with two batched matmuls over ``x`` seen as (B, L, in).
The stack copies N * r * (in + out) numbers per layer and forward, small beside the base layer's in * out; the
gathered copy is B * r * (in + out).

Design choices, and why:

- Every adapter's ``A`` and ``B`` are separate ``nn.Parameter``s (``nn.ParameterList``s of N), not slices of one
  stacked tensor: each concept's parameters are distinct tensors, so its own optimizer parameter group, gradient
  norm clipping and EMA are the plain per-tensor operations solo training uses (:func:`adapter_parameters`).
- One rank for the whole pack (a pack shares the adapter shape); ``alpha``, hence the scaling alpha / r, may
  differ per adapter (a buffer). Plain LoRA only: no dropout (PEFT's per-adapter ``lora_dropout`` is p = 0 here;
  a pack trains concepts whose ``dropout`` is 0), no DoRA/LoHa/LoKr, no rsLoRA, no bias, linears only (no LoCon
  convolutions).
- Which adapter each row uses is one :class:`RowIndex` that every packed layer of a model references, set for
  a forward with ``with rows(model, idx): ...``; a forward with no index, or with one whose length is not the
  batch's, raises instead of silently using a stale index. Index -1 is "no adapter": that row sees the base
  model alone (its delta is scaled by 0, so it adds nothing and sends no gradient to any adapter).
- Names and state dicts are PEFT's: a layer replaces the targeted ``nn.Linear`` in place and holds it as
  ``base_layer``, and :func:`load_adapter_state` / :func:`adapter_state` read and write one adapter under exactly
  the keys of ``peft.utils.get_peft_model_state_dict`` of a solo model (``<module>.lora_A.weight``,
  ``<module>.lora_B.weight``). A concept's adapter is therefore initialised as solo training initialises it
  (``add_adapter`` on a solo model, then copied in) and saved with solo's saver.
- The forward follows PEFT's LoRA ``Linear.forward``: the input is cast to the adapter's dtype (fp32 master
  weights over a bf16 base), added to the base output and cast back to the base output's dtype.

Every adapter takes part in every forward (the stack is differentiated as a whole): an adapter with no row in
the batch gets a zero gradient, not None. So DDP finds no unused parameters, but an optimizer must not step a
concept that had no rows (AdamW would still move it through its moments and weight decay).

With gradient checkpointing (diffusers' is non-reentrant) the forward of a checkpointed block runs again during
``backward()``: keep the ``rows`` context open around the backward too, or the recomputation finds no index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# The key suffixes of get_peft_model_state_dict (the adapter's name dropped).
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"


class RowIndex:
    """The adapter index of each row of the batch in flight, shared by every packed layer of one model.

    Set it through :func:`rows`. The index is checked on the host (1-D, integers in -1..N-1) when it is set and
    moved to a layer input's device once, on first use, not once per layer.
    """

    def __init__(self, n_adapters: int) -> None:
        self.n_adapters = n_adapters
        self._index: Tensor | None = None
        self._has_none = False  # whether a row may be -1 (unknown for an index already on a device: assumed)
        self._placed: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def set(self, index: Tensor | Sequence[int]) -> None:
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.dtype in (torch.bool,) or index.is_floating_point() or index.is_complex():
            raise ValueError(f"a row index is a 1-D integer tensor (one adapter per batch row), got dtype "
                             f"{index.dtype} and shape {tuple(index.shape)}")
        index, has_none = index.long(), True
        if index.device.type == "cpu":  # a device tensor is not read back: no host sync per step
            low, high = (int(index.min()), int(index.max())) if index.numel() else (0, 0)
            if low < -1 or high >= self.n_adapters:
                raise ValueError(f"row index values must be adapter numbers 0..{self.n_adapters - 1} (or -1 for "
                                 f"the base model alone), got {index.tolist()}")
            has_none = low < 0
        self._index, self._has_none, self._placed = index, has_none, {}

    def clear(self) -> None:
        self._index, self._placed = None, {}

    @property
    def index(self) -> Tensor | None:
        return self._index

    def for_input(self, x: Tensor, layer: str) -> tuple[Tensor, Tensor | None]:
        """(adapter of each row, clamped to >= 0; the rows' 0/1 keep mask, None when no row is -1) on ``x``'s
        device, for ``layer``'s input ``x`` (B, ..., in)."""
        if self._index is None:
            raise RuntimeError(
                f"packed LoRA layer {layer!r}: no row index is set; run the model inside "
                "`with rows(model, index):` (index: the adapter of each batch row; with gradient checkpointing the "
                "backward() too)")
        if x.ndim < 2 or x.shape[0] != len(self._index):
            raise RuntimeError(
                f"packed LoRA layer {layer!r}: the row index has {len(self._index)} entries but the input has "
                f"{x.shape[0] if x.ndim else 0} rows (shape {tuple(x.shape)}); set one adapter index per batch row")
        placed = self._placed.get(x.device)
        if placed is None:
            index = self._index.to(x.device, non_blocking=True)
            keep = (index >= 0).to(torch.float32) if self._has_none else None
            placed = self._placed[x.device] = (index.clamp(min=0), keep)
        return placed


class PackedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus N LoRA adapters of rank r, each row of the input through its own adapter."""

    def __init__(self, base_layer: nn.Linear, n_adapters: int, rank: int, alphas: Sequence[float],
                 row_index: RowIndex, name: str = "") -> None:
        super().__init__()
        if len(alphas) != n_adapters:
            raise ValueError(f"one alpha per adapter: {n_adapters} adapters, got {len(alphas)} alphas")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.name, self.rows = rank, name, row_index
        weight = base_layer.weight
        kwargs = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else None}
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, self.in_features, **kwargs))
                                       for _ in range(n_adapters))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.empty(self.out_features, rank, **kwargs))
                                       for _ in range(n_adapters))
        self.register_buffer("scaling", torch.tensor([a / rank for a in alphas], dtype=torch.float32,
                                                     device=weight.device), persistent=False)
        self.reset_parameters()

    @property
    def n_adapters(self) -> int:
        return len(self.lora_A)

    def reset_parameters(self) -> None:
        """PEFT's ``init_lora_weights="gaussian"`` (what solo training configures): A ~ N(0, 1/r), B = 0. Not
        solo's random stream: for solo's exact initial weights copy them in with :func:`load_adapter_state`."""
        with torch.no_grad():
            for a, b in zip(self.lora_A, self.lora_B):
                nn.init.normal_(a, std=1 / self.rank)
                nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        index, keep = self.rows.for_input(x, self.name)
        a = torch.stack(tuple(self.lora_A))[index]  # (B, r, in)
        b = torch.stack(tuple(self.lora_B))[index]  # (B, out, r)
        rows = x.to(a.dtype).reshape(x.shape[0], -1, self.in_features)  # (B, L, in)
        delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))  # (B, L, out)
        scale = self.scaling[index] if keep is None else self.scaling[index] * keep
        delta = delta * scale.to(delta.dtype)[:, None, None]
        return (result + delta.reshape(*x.shape[:-1], self.out_features)).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.n_adapters}, rank={self.rank}, scaling={self.scaling.tolist()}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of ``target_modules``: the module's full name is a target or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_packed_lora(model: nn.Module, target_modules: Sequence[str], n_adapters: int, rank: int,
                       alphas: float | Sequence[float]) -> RowIndex:
    """Replace each ``nn.Linear`` of ``model`` that ``target_modules`` names (PEFT's matching) by a
    :class:`PackedLoraLinear` of ``n_adapters`` adapters of rank ``rank`` (``alphas``: one, or one per adapter;
    scaling alpha / rank), and freeze everything else. Returns the model's :class:`RowIndex`."""
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    if n_adapters < 1:
        raise ValueError(f"n_adapters must be >= 1, got {n_adapters}")
    alphas = [float(alphas)] * n_adapters if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if any(isinstance(m, PackedLoraLinear) for m in model.modules()):
        raise ValueError("the model already has packed LoRA layers: inject once, with every adapter")
    matched = [(name, m) for name, m in model.named_modules() if name and _matches(name, target_modules)]
    if not matched:
        raise ValueError(f"target_modules {list(target_modules)} not found in the model ({type(model).__name__})")
    if wrong := [f"{name} ({type(m).__module__}.{type(m).__qualname__})" for name, m in matched
                 if type(m) is not nn.Linear]:
        raise TypeError(f"packed LoRA adapts plain nn.Linear layers only; target_modules {list(target_modules)} "
                        f"also match {wrong[:3]}{' ...' if len(wrong) > 3 else ''} (a PEFT adapter already on the "
                        "model? convolutions are not packed)")
    model.requires_grad_(False)
    row_index = RowIndex(n_adapters)
    for name, linear in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLoraLinear(linear, n_adapters, rank, alphas, row_index, name))
    return row_index


def packed_layers(model: nn.Module) -> Iterator[tuple[str, PackedLoraLinear]]:
    """(name, layer) of every packed layer of ``model``, in module order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, PackedLoraLinear))


def row_index_of(model: nn.Module | RowIndex) -> RowIndex:
    if isinstance(model, RowIndex):
        return model
    for _, layer in packed_layers(model):
        return layer.rows
    raise ValueError(f"{type(model).__name__} has no packed LoRA layers (inject_packed_lora first)")


@contextmanager
def rows(model: nn.Module | RowIndex, index: Tensor | Sequence[int]) -> Iterator[RowIndex]:
    """Within the block, row k of every batch through ``model``'s packed layers uses adapter ``index[k]`` (-1:
    none). Cleared on exit. Keep it open around ``backward()`` when blocks are gradient-checkpointed."""
    holder = row_index_of(model)
    holder.set(index)
    try:
        yield holder
    finally:
        holder.clear()


def _check_adapter(model: nn.Module, i: int) -> list[tuple[str, PackedLoraLinear]]:
    layers = list(packed_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no packed LoRA layers (inject_packed_lora first)")
    n = layers[0][1].n_adapters
    if not 0 <= i < n:
        raise IndexError(f"adapter {i} does not exist: the pack has adapters 0..{n - 1}")
    return layers


def adapter_state(model: nn.Module, i: int) -> dict[str, Tensor]:
    """Adapter ``i``'s weights under the keys ``get_peft_model_state_dict`` gives a solo model with one LoRA
    adapter on the same targets (``<module>.lora_A.weight``, ``<module>.lora_B.weight``), what the solo save path
    writes. Detached tensors sharing the parameters' storage, as a state dict's."""
    out = {}
    for name, layer in _check_adapter(model, i):
        out[f"{name}.{LORA_A}"] = layer.lora_A[i].detach()
        out[f"{name}.{LORA_B}"] = layer.lora_B[i].detach()
    return out


def adapter_parameters(model: nn.Module, i: int) -> list[nn.Parameter]:
    """Adapter ``i``'s parameters (one concept's optimizer group, clipping, EMA), in module order, A before B."""
    return [p for _, layer in _check_adapter(model, i) for p in (layer.lora_A[i], layer.lora_B[i])]


def load_adapter_state(model: nn.Module, i: int, state: Mapping[str, Tensor]) -> None:
    """Copy ``state``, a solo model's ``get_peft_model_state_dict`` (one LoRA adapter on the same targets, the
    pack's rank), into adapter ``i``. The key sets must be equal and the shapes the pack's; values are cast to
    the parameters' dtype."""
    params, layers = {}, _check_adapter(model, i)
    for name, layer in layers:
        params[f"{name}.{LORA_A}"], params[f"{name}.{LORA_B}"] = layer.lora_A[i], layer.lora_B[i]
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or extra:
        def some(keys: list[str]) -> str:
            return f"{len(keys)} ({keys[:3]}{' ...' if len(keys) > 3 else ''})"
        raise KeyError(f"adapter {i}'s state does not match the pack's layers: missing keys {some(missing)}, "
                       f"unexpected keys {some(extra)} (a PEFT LoRA state dict of one adapter on the pack's "
                       "target_modules, as get_peft_model_state_dict returns it, is expected)")
    if wrong := [f"{k}: {tuple(state[k].shape)}, the pack's {tuple(p.shape)}" for k, p in params.items()
                 if state[k].shape != p.shape]:
        raise ValueError(f"adapter {i}'s state has other shapes than the pack's (rank {layers[0][1].rank}): "
                         f"{len(wrong)} tensors, e.g. {wrong[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def remove_packed_lora(model: nn.Module) -> int:
    """Put each packed layer's frozen ``base_layer`` back in its place: ``model`` is the base model again (its
    adapters gone; read them with :func:`adapter_state` first). Returns the number of layers restored."""
    layers = list(packed_layers(model))
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return len(layers)
