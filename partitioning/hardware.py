"""Hardware profiles: peak FLOP/s, HBM capacity and bandwidth, interconnect per mesh axis.

Every number carries its source. TPU figures follow pope2022.md §2.1 (the paper's TPU v4 numbers)
and §2.2 (the scaling book's chip table); GPU figures come from NVIDIA's datasheets. The ``cpu``
profile is measured on the running machine by `partitioning.calibrate`.

Interconnect model (pope2022.md §2.2 [D]): on a TPU torus, a collective over one mesh axis uses the
bidirectional bandwidth of one ICI link (``axis_bw``); over k axes it uses k times that. On a
GPU NVLink domain every chip has one switch port (``axis_bw``) whatever the number of mesh axes.
Between granules (TPU slices, GPU nodes, processes) the slower data-center network (``dcn_bw``)
carries the cross-granule part of a collective (pope2022.md §2.2: DCN ~2.5e10 B/s per host).
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3
GB = 1e9


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """One accelerator chip and how chips are wired together."""

    name: str
    peak_flops_bf16: float
    """Dense bf16 matmul FLOP/s per chip."""
    peak_flops_int8: float
    """Dense int8 matmul OP/s per chip (used only if activations were quantized too)."""
    hbm_bytes: float
    """Memory capacity per chip."""
    hbm_bw: float
    """Memory bandwidth per chip, bytes/s."""
    axis_bw: float
    """Bytes/s one chip moves in a collective over one mesh axis (see module docstring)."""
    topology: str
    """'torus' (TPU ICI: bandwidth adds up over axes) or 'switch' (GPU NVLink / host memory)."""
    max_mesh_axes: int = 3
    """Physical torus dimensions (3 for v4/v5p, 2 for v5e/v6e); 3 logical axes for switches."""
    wrap_multiple: int | None = None
    """Torus axes get wrap-around links only if their length is a multiple of this (None: always)."""
    domain_size: int | None = None
    """Chips in one fast-interconnect domain (a GPU NVLink node); a plan for more chips spans
    chips / domain_size granules joined by DCN. None: any chip count is one domain (a TPU slice)."""
    dcn_bw: float | None = None
    """Per-chip bandwidth between granules (hosts or TPU slices) over the data-center network
    (InfiniBand on GPU nodes), bytes/s: collectives over a mesh axis that spans granules
    (`MeshShape.dcn`) pay it on their cross-granule leg. None: unknown (planning for several
    granules is refused)."""
    hop_latency_s: float = 1e-6
    """Fixed latency per ring step of a collective (scaling book: ~1 µs per ICI hop)."""
    sources: tuple[tuple[str, str], ...] = ()
    """(field, citation) pairs."""

    def source(self, field: str) -> str:
        """The citation for one field ('' if none)."""
        return dict(self.sources).get(field, "")


_SB = "pope2022.md §2.2 (scaling book chip table)"
_DCN = "pope2022.md §2.2: DCN ~2.5e10 B/s per host"
DCN_PER_HOST = 2.5e10
_PAPER = "pope2022.md §2.1 (Pope et al. 2022 p8)"

TPU_V4 = HardwareProfile(
    name="tpu-v4", peak_flops_bf16=275e12, peak_flops_int8=275e12, hbm_bytes=32 * GIB,
    hbm_bw=1.2e12, axis_bw=9e10, topology="torus", max_mesh_axes=3, wrap_multiple=4,
    dcn_bw=DCN_PER_HOST / 4,
    sources=(("peak_flops_bf16", _PAPER), ("dcn_bw", _DCN + ", 4 chips (2x2x1) per host"),
             ("hbm_bytes", _PAPER + ": 32 GiB"),
             ("hbm_bw", _PAPER + ": 1200 GB/s"), ("peak_flops_int8", _SB),
             ("axis_bw", "pope2022.md §2.2 [D]: 270 GB/s = 6 links x 4.5e10; one axis = 9e10 bidi"),
             ("wrap_multiple", "pope2022.md §2.2: wrap-around only for full 4x4x4 cubes")))

TPU_V5E = HardwareProfile(
    name="tpu-v5e", peak_flops_bf16=1.97e14, peak_flops_int8=3.94e14, hbm_bytes=16 * GB,
    hbm_bw=8.1e11, axis_bw=9e10, topology="torus", max_mesh_axes=2, dcn_bw=DCN_PER_HOST / 8,
    sources=(("dcn_bw", _DCN + ", 8 chips (4x2) per host"),
             ("*", _SB + ": 16GB, 8.1e11 B/s, 1.97e14 bf16, 3.94e14 int8, ICI 9e10 bidi/link, "
              "2D torus 16x16"),))

TPU_V5P = HardwareProfile(
    name="tpu-v5p", peak_flops_bf16=4.59e14, peak_flops_int8=9.18e14, hbm_bytes=96 * GB,
    hbm_bw=2.8e12, axis_bw=1.8e11, topology="torus", max_mesh_axes=3, wrap_multiple=4,
    dcn_bw=DCN_PER_HOST / 4,
    sources=(("dcn_bw", _DCN + ", 4 chips (2x2x1) per host"),
             ("*", _SB + ": 96GB, 2.8e12 B/s, 4.59e14 bf16, 9.18e14 int8, ICI 1.8e11 bidi/link, "
              "3D torus 16x20x28"),))

TPU_V6E = HardwareProfile(
    name="tpu-v6e", peak_flops_bf16=9.20e14, peak_flops_int8=1.84e15, hbm_bytes=32 * GB,
    hbm_bw=1.6e12, axis_bw=1.8e11, topology="torus", max_mesh_axes=2, dcn_bw=DCN_PER_HOST / 8,
    sources=(("dcn_bw", _DCN + ", 8 chips (4x2) per host"),
             ("*", _SB + ": 32GB, 1.6e12 B/s, 9.2e14 bf16, 1.84e15 int8, ICI 1.8e11 bidi/link, "
              "2D torus 16x16"),))

_A100_SRC = ("NVIDIA A100 datasheet (2021): 80GB HBM2e 2,039 GB/s; bf16 dense 312 TFLOPS "
             "(pope2022.md §2.3); int8 624 TOPS; NVLink3 600 GB/s total = 300 GB/s per direction; "
             "HGX 8-GPU domain; HDR InfiniBand 200 Gb/s per GPU")
A100_80GB = HardwareProfile(
    name="a100-80gb", peak_flops_bf16=312e12, peak_flops_int8=624e12, hbm_bytes=80 * GB,
    hbm_bw=2.039e12, axis_bw=300e9, topology="switch", domain_size=8, dcn_bw=25e9,
    hop_latency_s=5e-6, sources=(("*", _A100_SRC),))

_H100_SRC = ("NVIDIA H100 SXM5 datasheet: 80GB HBM3 3.35 TB/s; bf16 dense 989 TFLOPS; int8 1979 "
             "TOPS; NVLink4 900 GB/s total = 450 GB/s per direction; HGX 8-GPU domain; NDR "
             "InfiniBand 400 Gb/s per GPU")
H100_SXM = HardwareProfile(
    name="h100-sxm", peak_flops_bf16=989e12, peak_flops_int8=1979e12, hbm_bytes=80 * GB,
    hbm_bw=3.35e12, axis_bw=450e9, topology="switch", domain_size=8, dcn_bw=50e9,
    hop_latency_s=5e-6, sources=(("*", _H100_SRC),))

_H200_SRC = ("NVIDIA H200 SXM datasheet: 141GB HBM3e 4.8 TB/s; compute and NVLink as H100 SXM "
             "(989 TFLOPS bf16, 1979 TOPS int8, 900 GB/s NVLink4)")
H200 = HardwareProfile(
    name="h200", peak_flops_bf16=989e12, peak_flops_int8=1979e12, hbm_bytes=141 * GB,
    hbm_bw=4.8e12, axis_bw=450e9, topology="switch", domain_size=8, dcn_bw=50e9,
    hop_latency_s=5e-6, sources=(("*", _H200_SRC),))

PROFILES: dict[str, HardwareProfile] = {
    p.name: p for p in (TPU_V4, TPU_V5E, TPU_V5P, TPU_V6E, A100_80GB, H100_SXM, H200)}
ALIASES = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
           "a100": "a100-80gb", "h100": "h100-sxm", "h200-sxm": "h200"}


def hardware_names() -> tuple[str, ...]:
    """Every accepted profile name (aliases excluded), 'cpu' included."""
    return tuple(PROFILES) + ("cpu",)


def cpu_profile(measurement: dict) -> HardwareProfile:
    """A profile from a calibration result (see `partitioning.calibrate`)."""
    return HardwareProfile(
        name="cpu", peak_flops_bf16=measurement["matmul_flops"],
        peak_flops_int8=measurement["matmul_flops"], hbm_bytes=measurement["memory_bytes"],
        hbm_bw=measurement["memory_bw"], axis_bw=measurement["memory_bw"], topology="switch",
        dcn_bw=measurement.get("interprocess_bw"), hop_latency_s=1e-6,
        sources=(("*", f"measured by `jaxinfer calibrate` on {measurement.get('machine', '?')} "
                  f"at {measurement.get('timestamp', '?')}"),))


_DEVICE_KINDS = (("tpu v4", "tpu-v4"), ("tpu v5 lite", "tpu-v5e"), ("tpu v5e", "tpu-v5e"),
                 ("tpu v5", "tpu-v5p"), ("tpu v6", "tpu-v6e"), ("h200", "h200"),
                 ("h100", "h100-sxm"), ("a100", "a100-80gb"))


def detect_hardware(device) -> str:
    """The profile name for a `jax.Device` (its ``device_kind``); 'cpu' for host devices."""
    if device.platform == "cpu":
        return "cpu"
    kind = device.device_kind.lower()
    for pattern, name in _DEVICE_KINDS:
        if pattern in kind:
            return name
    raise ValueError(f"no hardware profile for device kind {device.device_kind!r}: pass "
                     f"--hardware (one of {', '.join(hardware_names())})")


def get_hardware(name: str) -> HardwareProfile:
    """Look a profile up by name or alias; 'cpu' loads (or runs) the cached calibration."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        from partitioning import calibrate
        return cpu_profile(calibrate.load_or_calibrate())
    if key not in PROFILES:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(hardware_names())}")
    return PROFILES[key]
