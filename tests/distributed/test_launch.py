"""How `torchrun` launches end: every rank of a finished run has destroyed its process group and
joined gloo's threads before the interpreter exits (task-parallel and FSDP2); two agents on this machine joined as two nodes by c10d rendezvous
give the single-process update and both exit 0; a rank that dies at a chosen meta-step (a fault
point, not a timed kill) ends the whole launch promptly with a non-zero exit that names it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metasft.checkpoint import latest_checkpoint
from metasft.cli import main

import procs
from conftest import write_tasks

pytestmark = pytest.mark.slow

EXACT = ["meta.algorithm=fomaml", "optim.name=sgd", "meta.outer_lr=1", "optim.clip_grad=null", "optim.weight_decay=0",
         "trainer.total_training_steps=1", "trainer.precision=fp32", "meta.meta_batch_size=3",
         "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.inner_lr=0.2", "meta.num_inner_steps=2",
         "data.chat_template=none", "optim.lr_scheduler=constant", "trainer.logger=[jsonl]", "trainer.device=cpu"]




def relative_update_error(initial, a, b):
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    den = sum(((a[k].double() - initial[k].double()) ** 2).sum() for k in a) ** 0.5
    assert float(den) > 0
    return float(num / den)


@pytest.mark.parametrize("extra", [["meta.algorithm=reptile", "model.lora_rank=4", "model.lora_alpha=8"],
                                   ["meta.algorithm=reptile", "model.use_fsdp=true"]], ids=["task-parallel", "fsdp"])
def test_no_gloo_thread_outlives_a_finished_run(tmp_path, tiny_llama_dir, extra):
    tasks = write_tasks(tmp_path / "tasks", 4, 5, 4)
    probe = Path(__file__).with_name("exit_probe.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(probe), "train", f"model.partial_pretrain={tiny_llama_dir}", *EXACT[1:], *tasks, *extra,
           "trainer.total_training_steps=2", f"trainer.default_local_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "120"}
    proc = procs.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "step_2").is_dir()


def test_the_exit_probe_sees_a_live_gloo_group():
    """Positive control: with a group alive, the probe finds gloo's threads by name (else every
    'no thread outlives the run' above would pass for the wrong reason)."""
    probe = Path(__file__).with_name("exit_probe.py")
    proc = procs.run([sys.executable, str(probe), "--control"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "gloo" in proc.stdout


def test_two_nodes_by_c10d_rendezvous_equal_one_process(tmp_path, tiny_llama_dir):
    tasks = write_tasks(tmp_path / "tasks", 4, 5, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", *EXACT, *tasks]
    assert main(["train", *args, f"trainer.default_local_dir={tmp_path / 'one'}"]) == 0
    # The rendezvous store is bound here, on a port the OS chose, and held for the whole launch: both
    # agents join it as clients (is_host=false), so no port is guessed and none can be taken meanwhile.
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))
    endpoint = f"127.0.0.1:{store.port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "120"}
    agents = []
    try:
        for node_rank in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=metasft-two-nodes",
                   "--rdzv_conf=is_host=false", f"--node_rank={node_rank}", "--max_restarts=0", "-m", "metasft",
                   "train", *args, f"trainer.default_local_dir={tmp_path / 'two'}"]
            # Each agent's output goes to a file, read once it has exited (a live pipe can block).
            log = open(tmp_path / f"node{node_rank}.log", "w")
            agents.append((procs.Started(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        codes = [proc.wait(timeout=300) for proc, _ in agents]
    finally:
        for proc, log in agents:
            proc.kill()
            log.close()
        del store
    logs = [(tmp_path / f"node{i}.log").read_text()[-2000:] for i in (0, 1)]
    assert codes == [0, 0], logs
    assert "world size 2" in "".join(logs)
    initial = load_file(tiny_llama_dir / "model.safetensors")
    one = load_file(tmp_path / "one" / "step_1" / "model.safetensors")
    two = load_file(tmp_path / "two" / "step_1" / "model.safetensors")
    assert relative_update_error(initial, one, two) <= 1e-4


def test_a_rank_dying_mid_run_ends_the_launch(tmp_path, tiny_llama_dir):
    tasks = write_tasks(tmp_path / "tasks", 4, 6, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
            "meta.inner_batch_size=3", "meta.num_inner_steps=2", "trainer.total_training_steps=100000",
            "trainer.save_freq=1", "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu",
            f"trainer.default_local_dir={tmp_path / 'run'}", *tasks]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "metasft", "train", *args]
    # Rank 1 SIGKILLs itself after meta-step 2; rank 0 is then waiting in a collective for it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "120",
           "METASFT_FAULT": "meta_step.end@2", "METASFT_FAULT_RANK": "1"}
    try:
        proc = procs.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the launch hung after one rank died")
    assert proc.returncode != 0
    # torchrun's failure summary names the rank and the signal that ended it.
    assert "Signal 9 (SIGKILL)" in proc.stderr and "rank      : 1" in proc.stderr, proc.stderr[-3000:]
    survivor = latest_checkpoint(tmp_path / "run")
    assert survivor is not None and int(survivor.name.split("_")[1]) >= 1
