"""Hardware profiles: peak FLOP/s, HBM capacity and bandwidth, interconnect per mesh axis.

Every number carries its source. TPU figures follow pope2022.md §2.1 (the paper's TPU v4 numbers)
and §2.2 (the scaling book's chip table); GPU figures come from NVIDIA's datasheets. The ``cpu``
profile is measured on the running machine by `partitioning.calibrate`.

Interconnect model (pope2022.md §2.2 [D]): on a TPU torus, a collective over one mesh axis uses the
bidirectional bandwidth of one ICI link (``axis_bw``); over k axes it uses k times that. On a
GPU NVLink domain every chip has one switch port (``axis_bw``) whatever the number of mesh axes.
Between granules (TPU slices, GPU nodes, processes) the slower data-center network (``dcn_bw``)
carries the cross-granule part of a collective (pope2022.md §2.2: DCN ~2.5e10 B/s per host).

Efficiency (`EfficiencyParams`, used by `partitioning.efficiency` for the expected step time):
tpu-v4's is fitted on the paper's measurements (``scripts/fit_cost_model.py``); the later TPUs
carry it over, unvalidated; the GPUs, with no measurement in the reference, keep the roofline's
assumptions (`roofline_efficiency`); ``cpu``'s is measured on this machine by `jaxinfer
calibrate` (`cpu_efficiency`) and checked by ``scripts/validate_cost_model.py``.
"""

from __future__ import annotations

import dataclasses
import math

GIB = 1024**3
GB = 1e9


@dataclasses.dataclass(frozen=True)
class EfficiencyParams:
    """How far below the roofline a real step runs (`partitioning.efficiency`, issue 16 item 1).

    Fitted by ``scripts/fit_cost_model.py`` on the measurements of pope2022.md (Tables 2-3, Figure
    8, §9); the bounds below are checked here and by the fit.
    """

    matmul_peak_fraction: float
    """Fraction of peak FLOP/s a large matmul reaches, in (0, 1]."""
    matmul_half_tokens: float
    """Rows (tokens) per chip of a matmul at which it reaches half of `matmul_peak_fraction`:
    efficiency = peak_fraction * M / (M + half_tokens), M the per-chip token count. >= 0."""
    hbm_fraction: float
    """Fraction of the HBM bandwidth weight and KV-cache reads reach, in (0, 1]."""
    link_fraction: float
    """Fraction of the interconnect bandwidth a collective's payload reaches, in (0, 1]."""
    collective_latency_s: float
    """Fixed cost of launching one collective (synchronisation, kernel start), seconds >= 0."""
    hop_latency_s: float
    """Latency of one ring step of a collective on the torus (per hop), seconds >= 0."""
    block_overhead_s: float
    """Fixed cost per residual sub-block per layer (layernorm, residual add, fusion boundaries;
    a serial layer has two sub-blocks, a parallel one, §7.1), seconds >= 0."""
    step_overhead_s: float
    """Fixed cost per step (embedding lookup, sampling, host dispatch), seconds >= 0."""
    comm_overlap: float
    """Fraction of the payload time of activation collectives next to a matmul that runs
    concurrently with it (Looped CollectiveEinsum, pope2022.md §7.2), in [0, 1]."""
    sources: tuple[tuple[str, str], ...] = ()
    """(field, citation) pairs; '*' for all fields."""
    matvec_fraction: float = 0.0
    """Fraction of peak FLOP/s a one-row matmul (M = 1 per chip) reaches where the backend runs
    it as a separate matrix-vector kernel (XLA:CPU: a GEMV streaming the weights at memory
    speed, while M >= 2 runs a packing GEMM), in [0, 1]; 0: no such kernel, the saturating
    curve holds at M = 1 too (TPU, GPU). Not fitted by ``scripts/fit_cost_model.py``."""
    attention_fraction: float = 0.0
    """Fraction of peak FLOP/s attention's QK^T, masked softmax and AV reach together, in [0, 1]
    (the FLOPs of `cost_model.attention_flops_per_chip`); 0: attention runs on the matmul curve
    like the projections (fused attention kernels; the fitted TPU profiles). XLA:CPU runs it as
    batched matmuls over a head_dim contraction with an unfused softmax between them. Not
    fitted by ``scripts/fit_cost_model.py``."""
    matmul_curve: tuple[tuple[float, float], ...] = ()
    """Measured (M, fraction of peak) points of matmuls with M rows per chip, M ascending; where
    given, the matmul efficiency interpolates them (linearly in log M and log fraction, the end
    points held beyond them) instead of the saturating curve: XLA:CPU's GEMM switches kernels
    with M, which no two-parameter curve follows. Not fitted by ``scripts/fit_cost_model.py``."""
    kv_fraction: float = 0.0
    """Fraction of the HBM bandwidth decode attention's KV-cache reads reach (the cache write
    and the per-sequence matrix-vector products over it included), in [0, 1]; 0: the weight
    reads' `hbm_fraction` (the fitted TPU profiles). Not fitted by
    ``scripts/fit_cost_model.py``."""

    def __post_init__(self):
        for name in ("matvec_fraction", "attention_fraction", "kv_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"EfficiencyParams.{name} must be in [0, 1], got {value!r}")
        ms = [m for m, _ in self.matmul_curve]
        if ms != sorted(set(ms)) or any(not (m > 0 and 0 < f <= 1)
                                        for m, f in self.matmul_curve):
            raise ValueError("EfficiencyParams.matmul_curve must be (M > 0, fraction in (0, 1]) "
                             f"points with M ascending, got {self.matmul_curve!r}")
        for name in ("matmul_peak_fraction", "hbm_fraction", "link_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"EfficiencyParams.{name} must be in (0, 1], got {value!r}")
        if not (math.isfinite(self.comm_overlap) and 0 <= self.comm_overlap <= 1):
            raise ValueError(f"EfficiencyParams.comm_overlap must be in [0, 1], "
                             f"got {self.comm_overlap!r}")
        for name in ("matmul_half_tokens", "collective_latency_s", "hop_latency_s",
                     "block_overhead_s", "step_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"EfficiencyParams.{name} must be finite and >= 0, "
                                 f"got {value!r}")

    def source(self, field: str) -> str:
        """The citation for one field ('' if none)."""
        table = dict(self.sources)
        return table.get(field, table.get("*", ""))


FIT_FIELDS = ("matmul_peak_fraction", "matmul_half_tokens", "hbm_fraction", "link_fraction",
              "collective_latency_s", "hop_latency_s", "block_overhead_s", "step_overhead_s",
              "comm_overlap")
"""The fitted `EfficiencyParams` fields, in the order ``scripts/fit_cost_model.py`` fits them."""

def roofline_efficiency(hop_latency_s: float) -> EfficiencyParams:
    """For hardware nothing has been measured on: the roofline's assumptions (peak throughput,
    no fixed costs, no overlap of communication) and its per-hop latency, so the expected time
    is the roofline's terms under the overlap model of `partitioning.efficiency`."""
    return EfficiencyParams(
        matmul_peak_fraction=1.0, matmul_half_tokens=0.0, hbm_fraction=1.0, link_fraction=1.0,
        collective_latency_s=0.0, hop_latency_s=hop_latency_s, block_overhead_s=0.0,
        step_overhead_s=0.0, comm_overlap=0.0,
        sources=(("*", "no measurement: the roofline's assumptions"),
                 ("hop_latency_s", "the profile's hop_latency_s (roofline)")))


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
    efficiency: EfficiencyParams | None = None
    """How far below the roofline a step runs (`partitioning.efficiency`), with sources; None:
    `roofline_efficiency` of this profile's hop latency (set on construction)."""

    def __post_init__(self):
        if self.efficiency is None:
            object.__setattr__(self, "efficiency", roofline_efficiency(self.hop_latency_s))

    def source(self, field: str) -> str:
        """The citation for one field ('' if none)."""
        return dict(self.sources).get(field, "")


_SB = "pope2022.md §2.2 (scaling book chip table)"
_DCN = "pope2022.md §2.2: DCN ~2.5e10 B/s per host"
DCN_PER_HOST = 2.5e10
_PAPER = "pope2022.md §2.1 (Pope et al. 2022 p8)"

_FIT = ("scripts/fit_cost_model.py on pope2022.md Tables 2-3, Figure 8 (multiquery lines) and "
        "§9 (bf16 decode 36.9 ms, offline 73% MFU, serial block +14%): 19 points, RMS log "
        "error 2.8%")
TPU_V4_EFFICIENCY = EfficiencyParams(
    matmul_peak_fraction=0.7672, matmul_half_tokens=20.77, hbm_fraction=0.8625,
    link_fraction=0.1854, collective_latency_s=1.822e-06, hop_latency_s=2.668e-06,
    block_overhead_s=1.596e-05, step_overhead_s=0.0, comm_overlap=0.532,
    sources=(("*", _FIT + "; the paper's layers priced (`efficiency_fit.PAPER_PARTS`)"),
             ("matmul_peak_fraction", _FIT + "; set by the WG-XYZ prefills (76%/73% MFU)"),
             ("step_overhead_s", _FIT + "; weakly determined (< 1% of every point)"),
             ("hbm_fraction", _FIT + "; set by Fig. 8's heads-sharded slope (2.1 µs per cached "
              "token) and int8 vs bf16 decode (28.5 vs 36.9 ms)"),
             ("link_fraction", _FIT + "; of the 270 GB/s interconnect (§2.1)"),
             ("comm_overlap", _FIT + "; Looped CollectiveEinsum hides comm 'partially or fully' "
              "(§7.2)")))
"""TPU v4 efficiencies, fitted on the paper's own measurements (issue 16 item 2)."""

_TRANSFERRED = ("no measurement of this chip in pope2022.md: the tpu-v4 fit (same XLA TPU "
                "software stack), transferred unvalidated")
TPU_TRANSFERRED_EFFICIENCY = dataclasses.replace(TPU_V4_EFFICIENCY,
                                                 sources=(("*", _TRANSFERRED),))
"""Later TPU generations until measured."""

TPU_V4 = HardwareProfile(
    name="tpu-v4", peak_flops_bf16=275e12, peak_flops_int8=275e12, hbm_bytes=32 * GIB,
    hbm_bw=1.2e12, axis_bw=9e10, topology="torus", max_mesh_axes=3, wrap_multiple=4,
    dcn_bw=DCN_PER_HOST / 4,
    sources=(("peak_flops_bf16", _PAPER), ("dcn_bw", _DCN + ", 4 chips (2x2x1) per host"),
             ("hbm_bytes", _PAPER + ": 32 GiB"),
             ("hbm_bw", _PAPER + ": 1200 GB/s"), ("peak_flops_int8", _SB),
             ("axis_bw", "pope2022.md §2.2 [D]: 270 GB/s = 6 links x 4.5e10; one axis = 9e10 bidi"),
             ("wrap_multiple", "pope2022.md §2.2: wrap-around only for full 4x4x4 cubes"),
             ("efficiency", _FIT)),
    efficiency=TPU_V4_EFFICIENCY)

TPU_V5E = HardwareProfile(
    name="tpu-v5e", peak_flops_bf16=1.97e14, peak_flops_int8=3.94e14, hbm_bytes=16 * GB,
    hbm_bw=8.1e11, axis_bw=9e10, topology="torus", max_mesh_axes=2, dcn_bw=DCN_PER_HOST / 8,
    sources=(("dcn_bw", _DCN + ", 8 chips (4x2) per host"),
             ("*", _SB + ": 16GB, 8.1e11 B/s, 1.97e14 bf16, 3.94e14 int8, ICI 9e10 bidi/link, "
              "2D torus 16x16"),),
    efficiency=TPU_TRANSFERRED_EFFICIENCY)

TPU_V5P = HardwareProfile(
    name="tpu-v5p", peak_flops_bf16=4.59e14, peak_flops_int8=9.18e14, hbm_bytes=96 * GB,
    hbm_bw=2.8e12, axis_bw=1.8e11, topology="torus", max_mesh_axes=3, wrap_multiple=4,
    dcn_bw=DCN_PER_HOST / 4,
    sources=(("dcn_bw", _DCN + ", 4 chips (2x2x1) per host"),
             ("*", _SB + ": 96GB, 2.8e12 B/s, 4.59e14 bf16, 9.18e14 int8, ICI 1.8e11 bidi/link, "
              "3D torus 16x20x28"),),
    efficiency=TPU_TRANSFERRED_EFFICIENCY)

TPU_V6E = HardwareProfile(
    name="tpu-v6e", peak_flops_bf16=9.20e14, peak_flops_int8=1.84e15, hbm_bytes=32 * GB,
    hbm_bw=1.6e12, axis_bw=1.8e11, topology="torus", max_mesh_axes=2, dcn_bw=DCN_PER_HOST / 8,
    sources=(("dcn_bw", _DCN + ", 8 chips (4x2) per host"),
             ("*", _SB + ": 32GB, 1.6e12 B/s, 9.2e14 bf16, 1.84e15 int8, ICI 1.8e11 bidi/link, "
              "2D torus 16x16"),),
    efficiency=TPU_TRANSFERRED_EFFICIENCY)

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


def cpu_efficiency(measurement: dict, devices: int = 1) -> EfficiencyParams:
    """`EfficiencyParams` of this machine from a calibration (`partitioning.calibrate`, whose
    docstring says how each number is measured), for `devices` simulated host devices.

    The fixed costs are CPU time of one thread launching a device's ops: `devices` devices
    on fewer cores take turns, so they scale by max(1, devices / cores). The collective
    latencies are measured across the calibration's own devices, every group at once, and
    taken as they are. Nothing overlaps: a host device runs its ops one after another, and a
    collective is a copy through the same cores and memory (comm_overlap 0). The bandwidths
    are the achieved ones (fractions 1)."""
    coll = measurement["collectives"]
    turns = max(1.0, devices / max(1, measurement.get("cores") or 1))
    src = f"`jaxinfer calibrate` on {measurement.get('machine', '?')}"
    return EfficiencyParams(
        matmul_peak_fraction=measurement["matmul_peak_fraction"],
        matmul_half_tokens=measurement["matmul_half_tokens"],
        matvec_fraction=measurement["matvec_fraction"],
        attention_fraction=measurement["attention_fraction"],
        kv_fraction=measurement["kv_fraction"], hbm_fraction=1.0, link_fraction=1.0,
        matmul_curve=tuple((m, min(rate / measurement["matmul_flops"], 1.0))
                           for m, rate in measurement.get("matmul_curve", ())),
        collective_latency_s=coll["latency_s"], hop_latency_s=coll["hop_latency_s"],
        block_overhead_s=turns * measurement["layer_overhead_s"] / 2,
        step_overhead_s=turns * measurement["step_overhead_s"], comm_overlap=0.0,
        sources=(("*", src),
                 ("matmul_peak_fraction", src + ": streamed-weight matmul chain, M >= 2"),
                 ("matmul_half_tokens", src + ": streamed-weight matmul chain, M >= 2"),
                 ("matvec_fraction", src + ": the chain at M = 1 (XLA:CPU GEMV)"),
                 ("attention_fraction", src + ": the XLA attention path at the bench model's "
                  "heads"),
                 ("kv_fraction", src + ": the XLA decode attention over a KV cache"),
                 ("matmul_curve", src + ": streamed-weight matmul chain, M = 1 ... 512"),
                 ("block_overhead_s", src + ": tiny-model decode step, slope over layers / 2 "
                  "sub-blocks (serial), x max(1, devices / cores)"),
                 ("step_overhead_s", src + ": its intercept, x max(1, devices / cores)"),
                 ("collective_latency_s", src + f": {coll['devices']} host devices"),
                 ("hop_latency_s", src + f": {coll['devices']} host devices, per device - 1"),
                 ("comm_overlap", "host devices run their ops in order (no overlap)")))


def cpu_profile(measurement: dict, devices: int = 1) -> HardwareProfile:
    """A profile from a calibration result (see `partitioning.calibrate`) for `devices`
    simulated host devices on this machine ('chips'): they share its cores and memory bus, so
    each gets 1/devices of the measured peak FLOP/s and bandwidth, and of the collective
    bandwidth measured across the calibration's devices times their count."""
    from partitioning.calibrate import VERSION, CalibrationVersionError

    if measurement.get("version") != VERSION:
        raise CalibrationVersionError(
            f"calibration of format version {measurement.get('version', 1)}, expected "
            f"{VERSION}: re-run `jaxinfer calibrate`")
    coll = measurement["collectives"]
    flops = measurement["matmul_flops"] / devices
    src = (f"measured by `jaxinfer calibrate` on {measurement.get('machine', '?')} at "
           f"{measurement.get('timestamp', '?')}, shared by {devices} device(s)")
    return HardwareProfile(
        name="cpu", peak_flops_bf16=flops, peak_flops_int8=flops,
        hbm_bytes=measurement["memory_bytes"] / devices,
        hbm_bw=measurement["memory_bw"] / devices,
        axis_bw=coll["bandwidth"] * coll["devices"] / devices, topology="switch",
        dcn_bw=measurement.get("interprocess_bw"), hop_latency_s=coll["hop_latency_s"],
        sources=(("*", src),), efficiency=cpu_efficiency(measurement, devices))


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


def get_hardware(name: str, devices: int = 1) -> HardwareProfile:
    """Look a profile up by name or alias; 'cpu' loads (or runs) the cached calibration, for
    `devices` simulated host devices sharing this machine (`cpu_profile`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        from partitioning import calibrate
        return cpu_profile(calibrate.load_or_calibrate(), devices)
    if key not in PROFILES:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(hardware_names())}")
    return PROFILES[key]
