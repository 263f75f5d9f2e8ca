"""Link presets of the scale simulator: a few physical numbers per machine, each with its source.

A preset is the per-rank view of one machine kind: the achieved bandwidth of one GPU's (or CPU
rank's) link inside its node (NVLink, shared memory, loopback TCP) and of its own NIC across
nodes (one NIC per GPU: rail-optimised H800/H100 nodes), per direction, plus fixed costs. The
time model (`epruntime.scale.timemodel`) turns traffic matrices into seconds with them.

Which numbers are cited and which were fitted, and on which rows, is written on each preset
(`sources`, `fitted`); `profiling/bench.py calibration` scores them on published rows they were
not fitted on. No preset has a per-row factor.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LinkPreset", "PRESETS", "get_preset"]

# Published figures used below (the calibration benchmark cites the same keys).
SOURCES = {
    "deepep-v1": "DeepEP README, V1 performance tables (deepseek-ai/DeepEP docs/legacy.md): "
                 "H800 ~160 GB/s NVLink, one CX7 400 Gb/s IB NIC (~50 GB/s) per GPU",
    "nccl-tests-267": "nccl-tests issue 267 (NVIDIA maintainers): alltoall cannot aggregate NICs; "
                      "a CX7 NDR 400 Gb/s NIC reaches 48-49 GB/s",
    "nccl-tests-212": "nccl-tests issue 212 (NVIDIA maintainer): NCCL's effective NVLink bandwidth "
                      "on 8xH100 is ~370 GB/s bus bandwidth (450 GB/s line rate minus ~20% protocol)",
    "nccl-tests-130": "nccl-tests issue 130 (NVIDIA maintainer): alltoall busbw = algbw x (n-1)/n; "
                      "with N nodes it approaches N/(N-1) x the per-GPU network bandwidth",
    "this-machine": "profiling/results/alltoall_cpu_fit.json: `bench.py alltoall --ep 2,4 "
                    "--sizes-kib 16,64,256,1024,4096,16384` on this 2-core machine (shared, busy)",
}


class LinkPreset(BaseModel):
    """Per-rank link model: bandwidths in bytes/s per direction, latencies in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    intra_bandwidth: float = Field(gt=0, description="bytes/s one rank moves to peers in its node")
    inter_bandwidth: float = Field(gt=0, description="bytes/s of one rank's NIC across nodes")
    latency: float = Field(ge=0, description="s per collective (launch, sync, notify) in dispatch")
    combine_latency: float | None = Field(None, ge=0, description="s per combine collective "
                                          "(None: as dispatch)")
    message_latency: float = Field(0.0, ge=0, description="s per non-empty message per rank "
                                   "(per-peer handshakes of gloo / the shm transport)")
    concurrent_tiers: bool = Field(True, description="NVLink and the NIC run at once (GPU); "
                                   "False: one shared path (CPU loopback, shared memory)")
    full_duplex: bool = Field(True, description="a rank sends and receives at once and takes "
                              "the larger side (GPU links); False: both sides are copies on the "
                              "rank's own core and add up (CPU), at `intra_bandwidth` per "
                              "direction as fitted on uniform rows: (send + receive) / 2")
    cores: int | None = Field(None, gt=0, description="CPU presets: cores the ranks of one host "
                              "share; more ranks than cores slow bandwidth and per-message cost")
    sources: list[str] = []
    fitted: str = ""

    def phase_latency(self, phase: str) -> float:
        if phase == "combine" and self.combine_latency is not None:
            return self.combine_latency
        return self.latency


# DeepEP's normal kernels (H800): NVLink rate fitted on the intranode EP8 dispatch row (153 GB/s
# logical = 134 GB/s on the wire: the rank's own 1/8 of the rows never leaves the GPU); NIC rate
# cited (48 GB/s); latencies those fitted on the low-latency rows (same GPUs, same NICs).
_H800_NVLINK = 138.4e9
_NIC_400G = 48e9
_LL_DISPATCH_LATENCY = 29.4e-6
_LL_COMBINE_LATENCY = 35.5e-6

PRESETS: dict[str, LinkPreset] = {p.name: p for p in [
    LinkPreset(
        name="h800-deepep", intra_bandwidth=_H800_NVLINK, inter_bandwidth=_NIC_400G,
        latency=_LL_DISPATCH_LATENCY, combine_latency=_LL_COMBINE_LATENCY,
        sources=[SOURCES["deepep-v1"], SOURCES["nccl-tests-267"]],
        fitted="intra_bandwidth: DeepEP's intranode EP8 dispatch row (153 GB/s logical, 7/8 of it "
               "on NVLink); latency, combine_latency: least squares on DeepEP's low-latency rows "
               "EP8, EP32, EP128; inter_bandwidth: cited, not fitted (48 GB/s per 400G NIC)"),
    LinkPreset(
        name="h100-nccl", intra_bandwidth=370e9, inter_bandwidth=_NIC_400G, latency=25e-6,
        sources=[SOURCES["nccl-tests-212"], SOURCES["nccl-tests-267"], SOURCES["nccl-tests-130"]],
        fitted="none: both bandwidths are the cited figures; the 25 us latency is an assumption "
               "(it only matters below ~1 MB per peer)"),
    # CPU presets: fitted on this machine's all-to-all (see `fit_cpu_preset`), EP=2 rows at
    # 64 KiB and 4 MiB per rank; scored on the other sizes and on EP=4.
    LinkPreset(
        name="cpu-gloo", intra_bandwidth=1.234e9, inter_bandwidth=1.234e9, latency=4.78e-4,
        concurrent_tiers=False, full_duplex=False, cores=2, sources=[SOURCES["this-machine"]],
        fitted="latency, bandwidth: two-point fit on gloo@64KiB/ep2 and gloo@4MiB/ep2 (gloo posts "
               "every peer's send and receive at once: its fixed cost is per collective)"),
    LinkPreset(
        name="cpu-shm", intra_bandwidth=1.517e9, inter_bandwidth=1.517e9, latency=0.0,
        message_latency=1.40e-4, concurrent_tiers=False, full_duplex=False, cores=2,
        sources=[SOURCES["this-machine"]],
        fitted="message_latency, bandwidth: two-point fit on shm@64KiB/ep2 and shm@4MiB/ep2 (the "
               "shm transport signals and waits on each peer's region: its fixed cost is per "
               "message)"),
]}


def get_preset(name: str) -> LinkPreset:
    if name not in PRESETS:
        raise ValueError(f"link preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]
