"""TPU topologies by name, chip specifications, and compile-only TPU devices on any host.

``launch.plan --topology=v5p:4x4x8`` compiles the train step with the TPU compiler on a
machine without TPUs: libtpu (installed by ``pip install "jax[tpu]"``) describes a
slice of any shape, and ``jax.experimental.topologies.get_topology_desc`` turns it
into compile-only devices that a mesh, shardings and ``jit(...).lower().compile()``
accept (what MaxText's ``train_compile`` does). Nothing runs; ``memory_analysis()``
and ``cost_analysis()`` come from the real TPU compiler.

Names. libtpu accepts ``GEN:AxB`` (v5e, v6e: 2-D torus of chips) or ``GEN:AxBxC``
(v4, v5p: 3-D), with ``GEN`` one of v4, v5p, v5e, v6e (libtpu refuses ``v5litepod``
and Cloud's ``v5p-256`` form). Cloud's accelerator-type names count *TensorCores*
for v4/v5p (two per chip, fused as one "megacore" device) and *chips* for v5e/v6e:
``v5p-256`` is 128 chips = ``v5p:4x4x8``, ``v5p-1024`` is 512 chips = ``v5p:8x8x8``,
``v5e-256`` = ``v5e:16x16``. :func:`parse` takes both forms (the Cloud form becomes
the standard shape of :data:`_STANDARD_3D` / the squarest 2-D grid). Seen with libtpu
0.0.42.1: every shape up to ``v5p:16x16x16`` (4096 chips) is accepted.

Chip figures (Google Cloud's TPU pages; HBM is what the TPU compiler allows a program,
as its out-of-memory message prints it, e.g. "of 95.74G hbm"): see :data:`CHIPS`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Any

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU generation. ``hbm_bytes``: usable HBM per device (= per chip: megacore
  chips are one device); ``peak_bf16_flops``: dense bf16 FLOP/s per chip;
  ``hbm_bw``: bytes/s; ``ici_bw``: bytes/s per chip, all links and directions."""
  name: str
  device_kind: str  # jax's device.device_kind of a compile-only device.
  dims: int  # Torus dimensions of a slice (2 or 3).
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bw: float
  ici_bw: float
  chip_config_name: str  # libtpu: 'megacore' fuses a chip's two TensorCores.
  cores_per_chip: int  # TensorCores per chip (Cloud's vN-K names count these for v4/v5p).
  max_chips: int  # Largest single slice Cloud sells.


# ICI: v4 2400 Gbps, v5e 1600, v5p 4800, v6e 3584 Gbps per chip (Cloud TPU pages).
CHIPS: dict[str, ChipSpec] = {
    'v4': ChipSpec('v4', 'TPU v4', 3, int(30.75 * GiB), 275e12, 1228e9, 300e9,
                   'megacore', 2, 4096),
    'v5e': ChipSpec('v5e', 'TPU v5 lite', 2, int(15.75 * GiB), 197e12, 819e9, 200e9,
                    'default', 1, 256),
    'v5p': ChipSpec('v5p', 'TPU v5', 3, int(95.74 * GiB), 459e12, 2765e9, 600e9,
                    'megacore', 2, 8960),
    'v6e': ChipSpec('v6e', 'TPU v6 lite', 2, int(31.25 * GiB), 918e12, 1640e9, 448e9,
                    'default', 1, 256),
}

# Cloud's shapes for 3-D slices (v4/v5p), by chip count.
_STANDARD_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
                128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
                2048: (8, 16, 16), 4096: (16, 16, 16)}


class TopologyError(ValueError):
  """A topology name that cannot be parsed or is not a TPU slice (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or ``num_slices`` identical slices joined by the data-centre network)."""
  chip: ChipSpec
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def name(self) -> str:
    """libtpu's name: ``v5p:4x4x8``."""
    return f'{self.chip.name}:{"x".join(map(str, self.shape))}'

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def cloud_name(self) -> str:
    """Cloud's accelerator type of one slice (``v5p-256``)."""
    return f'{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}'

  def describe(self) -> str:
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return (f'{self.name} ({self.cloud_name}, {self.chips_per_slice} chips{slices}; '
            f'{self.chip.hbm_bytes / GiB:.2f} GiB HBM and '
            f'{self.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip)')


def _grid_2d(chips: int) -> tuple[int, int]:
  """The squarest AxB = chips with A <= B (v5e-32 -> 4x8)."""
  a = int(math.isqrt(chips))
  while chips % a:
    a -= 1
  return a, chips // a


def parse(name: str, num_slices: int = 1) -> Topology:
  """``'v5p:4x4x8'`` or ``'v5p-256'`` (Cloud's name) -> :class:`Topology`."""
  text = name.strip().lower()
  if num_slices < 1:
    raise TopologyError(f'--num_slices={num_slices} must be >= 1.')
  m = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+)*)', text)
  m_cloud = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', text)
  gen = (m or m_cloud).group(1) if (m or m_cloud) else None
  if gen == 'v5litepod':
    gen = 'v5e'
  if gen not in CHIPS:
    raise TopologyError(
        f'--topology={name!r}: expected GEN:AxB[xC] (e.g. v5p:4x4x8, v5e:16x16, v6e:8x8) or '
        f"Cloud's GEN-N (e.g. v5p-256) with GEN one of {sorted(CHIPS)}.")
  chip = CHIPS[gen]
  if m:
    shape = tuple(int(s) for s in m.group(2).split('x'))
    if chip.dims == 2 and len(shape) == 3 and shape[2] == 1:
      shape = shape[:2]
    if len(shape) != chip.dims or min(shape) < 1:
      example = 'AxB (e.g. 16x16)' if chip.dims == 2 else 'AxBxC (e.g. 4x4x8)'
      raise TopologyError(f'--topology={name!r}: {gen} slices are {chip.dims}-D: use {gen}:{example}.')
  else:
    n = int(m_cloud.group(2))
    if n % chip.cores_per_chip:
      raise TopologyError(f'--topology={name!r}: {gen}-N counts TensorCores ({chip.cores_per_chip} '
                          f'per chip); N must be a multiple of {chip.cores_per_chip}.')
    chips = n // chip.cores_per_chip
    if chip.dims == 3:
      if chips not in _STANDARD_3D:
        raise TopologyError(f'--topology={name!r}: no standard shape for {chips} chips; give it '
                            f'as {gen}:AxBxC.')
      shape = _STANDARD_3D[chips]
    else:
      shape = _grid_2d(chips)
  chips = math.prod(shape)
  if chips > chip.max_chips:
    raise TopologyError(f'--topology={name!r}: {chips} chips exceed the largest {gen} slice '
                        f'({chip.max_chips}); use --num_slices for more.')
  return Topology(chip, shape, num_slices)


def libtpu_available() -> bool:
  """Whether this Python can compile for TPU (libtpu importable)."""
  return importlib.util.find_spec('libtpu') is not None


def devices(topo: Topology) -> list[Any]:
  """Compile-only TPU devices of ``topo`` (ids and ``slice_index`` per slice).

  Needs libtpu (``requirements-tpu.txt``); works on a CPU-only host.
  """
  from jax.experimental import topologies
  chips_per_host = (2, 2, 1)  # 4 chips per host (every generation has such hosts).
  if topo.chips_per_slice < 4:
    chips_per_host = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
  desc = topologies.get_topology_desc(
      platform='tpu', topology_name=topo.name, chip_config_name=topo.chip.chip_config_name,
      chips_per_host_bounds=chips_per_host, num_slices=topo.num_slices)
  return list(desc.devices)


def chip_for_device_kind(kind: str) -> ChipSpec | None:
  """The spec of a TPU ``device_kind`` ('TPU v5' is v5p, 'TPU v5 lite' is v5e)."""
  for spec in CHIPS.values():
    if kind == spec.device_kind:
      return spec
  return None
