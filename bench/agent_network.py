"""What a sandboxed agent's network namespace adds to its start: launcher to program exit.

Builds the service's own launcher (start-up plan: sandbox, AGENT_UID for root, cgroups,
limits) twice — with the network namespace and its socat bridges, and without — and times,
interleaved, how long an agent's launcher takes to run a program in it: ``true`` (the
sandbox alone), and the bundled CLI's ``--version`` (what the start-up probe runs). The
difference is what the namespace costs every agent start: the namespace itself and the two
bridges, started and waited for until they listen.

    .venv/bin/python -m bench.agent_network [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import attrs

from claude_code_api.agent.protocol import AgentSpec
from claude_code_api.agent.sandbox import AgentLauncher
from claude_code_api.agent.startup import plan_with_findings
from claude_code_api.config.settings import load_settings


def run_once(launcher: AgentLauncher, root: Path, program: list[str]) -> float:
    spec = AgentSpec(name="bench", home=root / uuid.uuid4().hex[:12], ephemeral=True)
    path = launcher.prepare(spec, uuid.uuid4().hex[:8], program)
    try:
        started = time.perf_counter()
        subprocess.run(
            [str(path)],
            env={**os.environ, **launcher.environment(spec)},
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return (time.perf_counter() - started) * 1000
    finally:
        launcher.cleanup(spec, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        data = Path(workdir) / "data"
        settings = load_settings({"DATA_DIR": str(data), "AGENT_SANDBOX": "on"})
        plan, _ = plan_with_findings(settings, os.environ, serving=False)
        with_network = plan.launcher
        if with_network.own_network is None:
            sys.exit("no network namespace here (socat missing?)")
        without = attrs.evolve(with_network, network=None)
        root = data / "workers" / "bench"
        programs = {"true": ["/bin/true"], "CLI --version": [str(with_network.cli), "--version"]}
        for name, program in programs.items():
            times: dict[str, list[float]] = {"without": [], "with": []}
            for round_ in range(args.rounds + 1):
                order = [("without", without), ("with", with_network)]
                for label, launcher in order if round_ % 2 else reversed(order):
                    elapsed = run_once(launcher, root, program)
                    if round_:  # (the first round warms the caches)
                        times[label].append(elapsed)
            medians = {label: statistics.median(values) for label, values in times.items()}
            print(
                f"{name}: without {medians['without']:.1f} ms, with {medians['with']:.1f} ms"
                f" (network namespace + bridges: +{medians['with'] - medians['without']:.1f} ms;"
                f" p90 with {statistics.quantiles(times['with'], n=10)[-1]:.1f} ms;"
                f" median of {args.rounds})"
            )


if __name__ == "__main__":
    main()
