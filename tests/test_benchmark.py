"""experiments/benchmark.py end to end at the test scale: every section measured and tabled."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import env_for_timing

pytest.importorskip("torch")  # the PyTorch + peft arm; CI installs both (.ci/run)
pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_measures_every_section(tmp_path):
  out = str(tmp_path / "bench")
  env = env_for_timing(SOFTJAX_CACHE_DIR=str(tmp_path / "cache"))
  done = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scale=test",
                         "--rounds=2", "--devices=2", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.load(open(os.path.join(out, "benchmark.json")))
  torch_arm = record["torch"]
  assert torch_arm["softjax"]["round_s"] > 0 and torch_arm["torch"]["round_s"] > 0
  assert torch_arm["torch_over_softjax"] == pytest.approx(
      torch_arm["torch"]["round_s"] / torch_arm["softjax"]["round_s"])
  # tiny ViT, rank 4 on q/v: the same trainable set on both sides (512 LoRA + 170 head).
  assert torch_arm["torch"]["trainable"] == 682
  assert [r["parallelism"] for r in record["parallelism"]["runs"]] == [1, 2, 3]
  assert record["mesh"]["fake_devices"] and record["mesh"]["sharded"][0]["mesh_devices"] == 2
  flops = record["flops"]
  # The analytic count (matmuls only) is within 25 % of XLA's own count of one local step.
  assert 0.75 < flops["round_flops"] / flops["xla_step_flops_x_KE"] < 1.25
  assert 0 < flops["utilization"] < 1.5
  assert record["compile"]["first_call_s"] > record["compile"]["round_s"]
  host = record["host"]
  assert host["rounds_timed"] == 2 and 0 < host["host_share"] < 1
  assert host["solver_s"] <= host["host_s"] <= host["round_s"]
  clients = record["clients"]
  arms = {(a["num_clients"], a["store"]): a for a in clients["arms"]}
  assert set(arms) == {(12, "device"), (12, "host"), (24, "device"), (24, "host")}
  growth = clients["device_growth_smallest_to_largest_n"]
  # Twice the clients: the device store holds twice the residuals, the host store none of them.
  assert abs(growth["host_k3"]) < 0.1 < growth["device_k3"]
  assert arms[24, "host"]["host_store_bytes"] > arms[12, "host"]["host_store_bytes"] > 0
  assert arms[12, "device"]["host_store_bytes"] == 0
  assert record["cpu_model"] and "jaxlib_version" in record
  table = open(os.path.join(out, "benchmark.md")).read()
  assert "PyTorch / softjax" in table and "utilization" in table and "client_parallelism" in table
  assert "| 3 | 24 | host |" in table and "Machine:" in table


@pytest.mark.slow
def test_rules_section_times_e7_arms_on_one_machine(tmp_path):
  out = str(tmp_path / "rules")
  # Two arms beside FedIT (the default times all ten: test_rules_section_arms_...).
  done = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scale=test",
                         "--rounds=3", "--passes=1", "--sections=rules", "--rules=hetlora,soft",
                         f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env_for_timing())
  assert done.returncode == 0, done.stderr[-3000:]
  rules = json.load(open(os.path.join(out, "benchmark.json")))["rules"]
  arms = {a["arm"]: a for a in rules["arms"]}
  assert tuple(arms) == ("fedit", "hetlora", "soft")
  assert arms["fedit"]["over_fedit"] == 1.0
  for a in arms.values():
    assert a["round_traces"] == [1], a  # one trace per run: no recompiles between rounds
    assert len(a["per_pass_s"]) == 1 and a["round_s"] > 0
    assert a["over_fedit"] == pytest.approx(a["round_s"] / arms["fedit"]["round_s"])
  table = open(os.path.join(out, "benchmark.md")).read()
  assert "| hetlora |" in table and "vs FedIT" in table


def test_rules_section_arms_are_every_rule_and_soft_or_fedit_and_the_chosen():
  from experiments import rule_benchmark
  from softjax import errors
  from softjax.config import choices

  assert rule_benchmark.arms() == (*choices.AGGREGATION_RULES, "soft")
  assert rule_benchmark.arms(["soft", "flora"]) == ("fedit", "flora", "soft")
  with pytest.raises(errors.UserError, match=r"--rules has unknown names \['fedavg'\]"):
    rule_benchmark.arms(["fedavg"])


def test_rules_section_times_e7_configurations_with_only_evaluation_and_backbone_changed():
  from experiments import e7, rule_benchmark

  def flat(config):
    return {f"{group}.{k}": v for group, sub in config.to_dict().items()
            for k, v in (sub.items() if isinstance(sub, dict) else [("", sub)])}

  for arm in rule_benchmark.arms():
    timed = flat(rule_benchmark.timing_config(arm, "test", 4))
    e7_arm = flat(e7.arm_config(arm, "test", 4, "unused.npz"))
    changed = {k for k in timed if timed[k] != e7_arm[k]}
    assert "model.backbone" in changed and changed <= {
        "model.backbone", "eval.every", "eval.num_examples", "eval.final_full",
        "checkpoint.every"}, (arm, changed)
    assert timed["eval.every"] == timed["checkpoint.every"] == 4


@pytest.mark.slow
def test_accelerator_section_runs_every_arm_at_test_scale(tmp_path):
  out = str(tmp_path / "accel")
  done = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scale=test",
                         "--rounds=1", "--sections=accelerator", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env_for_timing())
  assert done.returncode == 0, done.stderr[-3000:]
  accel = json.load(open(os.path.join(out, "benchmark.json")))["accelerator"]
  clients = accel["clients"]
  assert clients["vmapped"]["parallelism"] == 3 and clients["sequential"]["parallelism"] == 1
  assert clients["loop_over_vmapped"] == pytest.approx(
      clients["python_loop"]["round_s"] / clients["vmapped"]["round_s"])
  sweep = accel["sweep"]
  assert sweep["members"] == 2 and sweep["sweep"]["members"] == 2
  # Two members are twice one run's training FLOPs.
  assert sweep["sweep"]["round_flops"] == 2 * sweep["one_run"]["round_flops"]
  assert accel["torch"]["torch"]["round_s"] > 0 and 0 < accel["flops"]["utilization"] < 1.5
  table = open(os.path.join(out, "benchmark.md")).read()
  assert "Python loop of jitted clients" in table and "separate / sweep" in table


@pytest.mark.slow
def test_cpu_levers_time_each_arm_in_its_own_process(tmp_path):
  out = str(tmp_path / "levers.json")
  # Two levers beside the default (the default run times all: test_cpu_levers_arms_...).
  done = subprocess.run([sys.executable, "-m", "experiments.cpu_levers", "--scale=test",
                         "--passes=1", "--arms=onednn,all_clients_vmapped", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env_for_timing())
  assert done.returncode == 0, done.stderr[-3000:]
  arms = json.load(open(out))["arms"]
  assert list(arms) == ["default", "all_clients_vmapped", "onednn"]
  assert arms["default"]["speedup_vs_default"] == 1.0
  assert arms["onednn"]["xla_flags"] == "--xla_cpu_use_onednn=true"
  assert arms["all_clients_vmapped"]["parallelism"] == 0  # 0: all K clients in one vmap
  assert all(a["round_s"] > 0 and len(a["pass_medians"]) == 1 for a in arms.values())


def test_rules_section_pairs_each_pass_with_fedit_s_pass():
  from experiments import rule_benchmark

  record = {"config_scale": "cpu", "rounds": 4, "passes": 2,
            "arms": [{"arm": "fedit", "round_s": 1.5, "per_pass_s": [1.0, 2.0], "over_fedit": 1.0},
                     {"arm": "fedex", "round_s": 3.0, "per_pass_s": [1.5, 2.4],
                      "over_fedit": 2.0}]}
  assert rule_benchmark.paired_ratios(record) == {"fedit": [1.0, 1.0],
                                                  "fedex": [1.5, pytest.approx(1.2)]}
  # mean 1.35; half-width t(0.975, 1) * s / sqrt(2) = 12.706 * 0.212 / 1.414 = 1.91
  assert "| fedex | 3.000 | 1.500 / 2.400 | 2.00x | 1.35 ± 1.91x |" in rule_benchmark.markdown(
      record)


def test_cpu_levers_arms_are_every_lever_or_the_default_and_the_named():
  from experiments import round_timing
  from softjax import errors

  assert round_timing.chosen_levers([]) == round_timing.CPU_LEVERS
  assert list(round_timing.chosen_levers(["fast_math"])) == ["default", "fast_math"]
  with pytest.raises(errors.UserError, match=r"--arms has unknown names \['avx'\]"):
    round_timing.chosen_levers(["avx"])


def test_every_lever_s_xla_flags_are_known_to_this_jaxlib():
  """XLA aborts on a flag it does not know, so an arm whose flag a jaxlib upgrade renamed
  (the YNN / XNN fusion lists are experimental) fails here instead of mid-benchmark."""
  from experiments import round_timing

  flag_sets = sorted({f for f, _ in round_timing.CPU_LEVERS.values() if f})
  code = "import jax.numpy as jnp; print(float((jnp.ones((4, 4)) @ jnp.ones((4, 4))).sum()))"
  for flags in flag_sets:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "XLA_FLAGS": flags})
    assert done.returncode == 0 and done.stdout.split()[-1] == "64.0", (flags, done.stderr[-800:])


def test_machine_names_the_cpu_generation_behind_a_vendor_only_model_name():
  from experiments import round_timing

  record = round_timing.machine()
  assert set(record) >= {"cpu_model", "cpu_family", "cpu_model_number", "cpu_flags"}
  zen1 = {"cpu_model": "AMD EPYC", "cpu_family": "23", "cpu_model_number": "1"}
  assert round_timing.cpu_name(zen1) == "AMD EPYC (family 23, model 1)"
  # Records written before the family was recorded still read.
  assert round_timing.cpu_name({"cpu_model": "AMD EPYC"}) == "AMD EPYC"
