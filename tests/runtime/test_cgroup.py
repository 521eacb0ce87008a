"""The CPU quota from cgroup v2 and v1 folders laid out as the kernel does, this machine's own, and the
session options that follow it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zeroserve.runtime.cgroup import cpu_quota
from zeroserve.runtime.providers import session_options
from zeroserve.runtime.settings import ProviderSettings


def v2_root(tmp_path: Path, cpu_max: str | None) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def v1_root(tmp_path: Path, quota: int, period: int = 100_000, folder: str = "cpu") -> Path:
    cpu = tmp_path / folder
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("150000 100000", 2),
        ("max 100000", 8),
        ("1000 100000", 1),
        ("400000 100000", 4),
        ("garbage", 8),
        (None, 8),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str | None, expected: int) -> None:
    root = v2_root(tmp_path, cpu_max)
    assert cpu_quota(root, host_cpus=8, proc_cgroup=tmp_path / "absent") == expected


def test_cgroup_v2_follows_own_cgroup_and_its_parents(tmp_path: Path) -> None:
    root = v2_root(tmp_path, None)  # the host's root cgroup has no cpu.max
    pod = root / "kubepods" / "pod1"
    (pod / "ctr").mkdir(parents=True)
    (pod / "cpu.max").write_text("250000 100000\n")  # the pod's limit binds the container
    (pod / "ctr" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    assert cpu_quota(root, host_cpus=16, proc_cgroup=proc) == 3


def test_cgroup_v2_path_outside_namespace_uses_mount_root(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "200000 100000")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/../../elsewhere\n")
    assert cpu_quota(root, host_cpus=16, proc_cgroup=proc) == 2


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [(-1, 100_000, 8), (150_000, 100_000, 2), (50_000, 100_000, 1), (300_000, 100_000, 3)],
)
def test_cgroup_v1_quota(tmp_path: Path, quota: int, period: int, expected: int) -> None:
    root = v1_root(tmp_path, quota, period)
    assert cpu_quota(root, host_cpus=8, proc_cgroup=tmp_path / "absent") == expected


def test_cgroup_v1_combined_mount_and_host_path_absent_in_container(tmp_path: Path) -> None:
    root = v1_root(tmp_path, 200_000, folder="cpu,cpuacct")
    proc = tmp_path / "proc-cgroup"
    # Docker on v1 shows the host's path; the container's mount root is that cgroup already.
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota(root, host_cpus=8, proc_cgroup=proc) == 2


def test_no_cgroup_gives_host_cpus(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path, host_cpus=5, proc_cgroup=tmp_path / "absent") == 5


def test_quota_capped_by_affinity(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "100000000 100000")  # 1000 CPUs
    assert cpu_quota(root, proc_cgroup=tmp_path / "absent") == len(os.sched_getaffinity(0))
    assert cpu_quota(root, host_cpus=3, proc_cgroup=tmp_path / "absent") == 3


def test_never_below_one(tmp_path: Path) -> None:
    assert cpu_quota(v2_root(tmp_path, "1 100000"), host_cpus=0, proc_cgroup=tmp_path / "absent") == 1


def test_cpu_quota_on_this_machine() -> None:
    assert 1 <= cpu_quota() <= len(os.sched_getaffinity(0))


def test_session_options_use_cpu_quota(tmp_path: Path) -> None:
    import onnxruntime as ort

    options = session_options(ProviderSettings(), cgroup_root=v2_root(tmp_path, "150000 100000"))
    assert options.intra_op_num_threads == min(2, len(os.sched_getaffinity(0)))
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
