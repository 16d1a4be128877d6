"""Jetson detection: L4T / JetPack release, board model, nvpmodel power mode, jetson_clocks state, memory.

Everything is read below a `root` folder (default "/") so tests can use fake files, and the only commands run
(`nvpmodel -q`, `dpkg-query`) go through a `run` callable that tests replace. Nothing here needs root rights:
the jetson_clocks state is inferred from the clocks (min frequency locked to max), as `jetson_clocks --show`
needs sudo.

    info = detect_jetson()          # None when this is not a Jetson
    info["l4t"], info["jetpack"], info["power_mode"]["name"], info["jetson_clocks"]
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

Runner = Callable[[list[str]], "str | None"]

# L4T release -> JetPack release, for when dpkg does not know the nvidia-jetpack meta-package.
L4T_TO_JETPACK = {
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}
SOC_NAMES = {"tegra194": "Xavier", "tegra234": "Orin", "tegra264": "Thor", "tegra210": "Nano (TX1)", "tegra186": "TX2"}
# SM of the Jetson SoCs whose compute capability every CUDA release agrees on (Xavier 7.2, Orin 8.7), for when
# nvidia-smi reports the compute capability as "[N/A]"
SOC_SM = {"tegra194": 72, "tegra234": 87}
ROOT = Path("/")  # where /proc/device-tree, /etc/nv_tegra_release ... are read (tests point it at fixture files)


def jetson_module(model: str | None) -> str | None:
    """The module a device-tree model names: 'NVIDIA Jetson AGX Orin Developer Kit' -> 'Jetson AGX Orin', '... Orin NX
    ...' -> 'Jetson Orin NX', '... Orin Nano ...' -> 'Jetson Orin Nano'; None for anything else. Every Orin module's
    GPU is "Orin" to CUDA, with 4 to 16 SMs and DLA only on AGX Orin / Orin NX: engines built on one module are for
    that module (NVIDIA: engines are specific to the GPU model they were built on)."""
    m = re.search(r"Jetson\s+(AGX\s+)?(Orin|Xavier|Thor|TX2)(\s+(?:NX|Nano))?", model or "", flags=re.I)
    if not m:
        return None
    words = [w.strip() for w in (m.group(1), m.group(2), m.group(3)) if w and w.strip()]
    return "Jetson " + " ".join(w.upper() if w.upper() in ("AGX", "NX", "TX2") else w.capitalize() for w in words)


def run_command(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout of `cmd`, or None when it is not installed, fails or times out."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel.lstrip("/")).read_text(errors="replace")
    except OSError:
        return None


def parse_tegra_release(text: str) -> dict | None:
    """'# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, ...' -> {"l4t": "36.4.0", "major": 36, ...}."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None
    major, rev = int(m.group(1)), m.group(2).split(".")
    release = ".".join([str(major), *(rev + ["0"])[:2]])
    fields = dict(re.findall(r"(\w+):\s*([^,]+)", text))
    return {"l4t": release, "l4t_major": major, "board": fields.get("BOARD", "").strip() or None, "raw": text.strip().splitlines()[0]}


def parse_meminfo(text: str) -> dict:
    """/proc/meminfo -> {"total_bytes", "available_bytes", "free_bytes", "swap_total_bytes", "swap_free_bytes"}."""
    kb = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+)\s*kB", text, flags=re.M)}
    return {
        "total_bytes": kb.get("MemTotal"),
        "available_bytes": kb.get("MemAvailable", kb.get("MemFree")),
        "free_bytes": kb.get("MemFree"),
        "swap_total_bytes": kb.get("SwapTotal"),
        "swap_free_bytes": kb.get("SwapFree"),
    }


def read_meminfo(root: str | Path = "/") -> dict | None:
    text = _read(Path(root), "proc/meminfo")
    return parse_meminfo(text) if text else None


def parse_nvpmodel_conf(text: str) -> dict:
    """{"modes": {id: name}, "default": id or None} from /etc/nvpmodel.conf."""
    modes = {int(i): n for i, n in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", text)}
    m = re.search(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)", text)
    return {"modes": modes, "default": int(m.group(1)) if m else None}


def parse_nvpmodel_query(text: str) -> dict | None:
    """`nvpmodel -q` -> {"name", "id"} ('NV Power Mode: MAXN' then the id on its own line)."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not m:
        return None
    ids = re.findall(r"^\s*(\d+)\s*$", text[m.end():], flags=re.M)
    return {"name": m.group(1), "id": int(ids[0]) if ids else None}


def power_mode(root: Path, run: Runner) -> dict:
    """Current nvpmodel mode: from `nvpmodel -q` when available, else /var/lib/nvpmodel/status + the conf."""
    conf_text = _read(root, "etc/nvpmodel.conf")
    conf = parse_nvpmodel_conf(conf_text) if conf_text else {"modes": {}, "default": None}
    q = run(["nvpmodel", "-q"])
    if q:
        mode = parse_nvpmodel_query(q)
        if mode:
            if mode["id"] is None:
                mode["id"] = next((i for i, n in conf["modes"].items() if n == mode["name"]), None)
            return {**mode, "source": "nvpmodel -q", "available": conf["modes"], "default": conf["default"]}
    status = _read(root, "var/lib/nvpmodel/status")
    if status:
        m = re.search(r"pmode:(\d+)", status)
        if m:
            i = int(m.group(1))
            return {"name": conf["modes"].get(i), "id": i, "source": "/var/lib/nvpmodel/status", "available": conf["modes"], "default": conf["default"]}
    if conf["modes"]:
        return {"name": None, "id": None, "source": "unknown (nvpmodel not found)", "available": conf["modes"], "default": conf["default"]}
    return {"name": None, "id": None, "source": "unknown (no /etc/nvpmodel.conf)", "available": {}, "default": None}


def _int(root: Path, rel: str) -> int | None:
    text = _read(root, rel)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def clocks_state(root: Path) -> dict:
    """jetson_clocks locks every clock's minimum to its maximum; report 'on', 'off' or 'unknown' and the evidence."""
    evidence = {}
    cpu = Path("sys/devices/system/cpu")
    cpu_dirs = sorted((root / cpu).glob("cpu[0-9]*/cpufreq")) if (root / cpu).is_dir() else []
    cpu_locked = []
    for d in cpu_dirs:
        rel = str(d.relative_to(root))
        lo, hi = _int(root, f"{rel}/scaling_min_freq"), _int(root, f"{rel}/cpuinfo_max_freq") or _int(root, f"{rel}/scaling_max_freq")
        if lo is not None and hi is not None:
            cpu_locked.append(lo >= hi)
    if cpu_locked:
        evidence["cpu_min_eq_max"] = all(cpu_locked)
    gpu_locked = None
    devfreq = root / "sys/class/devfreq"
    if devfreq.is_dir():
        for d in sorted(devfreq.iterdir()):
            if any(k in d.name for k in ("gpu", "ga10b", "gv11b", "gp10b", "gb10b")):
                rel = str(d.relative_to(root))
                lo, hi = _int(root, f"{rel}/min_freq"), _int(root, f"{rel}/max_freq")
                if lo is not None and hi is not None:
                    gpu_locked = lo >= hi
                    evidence["gpu_min_eq_max"] = gpu_locked
                break
    if not evidence:
        return {"state": "unknown", "evidence": {}}
    on = all(v for v in evidence.values())
    return {"state": "on" if on else "off", "evidence": evidence}


def jetpack_release(l4t: str | None, run: Runner) -> tuple[str | None, str]:
    """(JetPack release, source): dpkg's nvidia-jetpack version, else the L4T table."""
    out = run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    if out and out.strip():
        m = re.match(r"(\d+(?:\.\d+)*)", out.strip())
        if m:
            return m.group(1), "dpkg nvidia-jetpack"
    if l4t and l4t in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[l4t], "L4T release table"
    return None, "unknown"


def device_tree(root: str | Path | None = None) -> dict:
    """{"model", "soc", "module"} from the device tree (/proc/device-tree/model and compatible, below `root`, default
    ROOT): cheap, no commands run; all None off Jetson."""
    root = Path(root if root is not None else ROOT)
    model = _read(root, "proc/device-tree/model") or _read(root, "sys/firmware/devicetree/base/model")
    model = model.replace("\x00", "").strip() or None if model else None
    compatible = _read(root, "proc/device-tree/compatible") or ""
    soc = next((s for s in re.split(r"[\x00,\s]+", compatible) if s.startswith("tegra")), None)
    return {"model": model, "soc": soc, "module": jetson_module(model)}


def detect_jetson(root: str | Path | None = None, run: Runner | None = None) -> dict | None:
    """Jetson facts, or None when `root` (default ROOT, "/") is not a Jetson (no /etc/nv_tegra_release and no Jetson
    device-tree model)."""
    root = Path(root if root is not None else ROOT)
    run = run or run_command
    rel_text = _read(root, "etc/nv_tegra_release")
    tree = device_tree(root)
    model, soc = tree["model"], tree["soc"]
    if rel_text is None and not (model and "jetson" in model.lower()):
        return None
    release = parse_tegra_release(rel_text) if rel_text else None
    l4t = release["l4t"] if release else None
    jetpack, jp_source = jetpack_release(l4t, run)
    return {
        "model": model,
        "module": tree["module"],
        "soc": soc,
        "soc_name": SOC_NAMES.get(soc or ""),
        "l4t": l4t,
        "l4t_board": release["board"] if release else None,
        "jetpack": jetpack,
        "jetpack_source": jp_source,
        "power_mode": power_mode(root, run),
        "jetson_clocks": clocks_state(root),
        "memory": read_meminfo(root),
    }
