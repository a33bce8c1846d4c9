# Tests for vldac.py and rollout.py (the VL-DAC core). Run: python -m pytest -q test_core.py
# They use an UNTRAINED tiny Qwen2-VL built in seconds: the maths does not need a model that can see.
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

import envs
import rollout
import tiny_vlm
import vldac

HERE = Path(__file__).resolve().parent
ENV_ID = "gym_cards/NumberLine-v0"
# One thread: on a machine whose cores are shared, two OpenMP threads on these tiny matrices stall
# (measured: 30 s instead of 0.4 s for one batched generate under load). Subprocesses get the same.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Model + processor of the tiny VLM without pre-training, saved like a real checkpoint."""
    out = tmp_path_factory.mktemp("tiny_untrained")
    cfg = tiny_vlm.TinyConfig(pretrain_steps=0)
    torch.manual_seed(cfg.seed)
    processor = tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(tiny_vlm.StateSampler(cfg.env_ids, cfg.seed)))
    tiny_vlm.build_model(cfg, processor.tokenizer).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_vlm.json").write_text(json.dumps({"pretrain_steps": 0}))  # marks it tiny: TINY_DEFAULTS apply
    return out


def make_args(model_dir, **overrides):
    fields = dict(env_id=ENV_ID, model_id=str(model_dir), num_envs=2, num_steps=2, total_timesteps=4,
                  minibatch_size=4, micro_batch_size=2, max_new_tokens=6, lora_r=0)
    return vldac.resolve_args(vldac.Args(**{**fields, **overrides}))


def make_agent(args, seed=0):
    torch.manual_seed(seed)
    policy, processor = vldac.load_policy(args.model_id, "cpu", args.lora_r, args.lora_alpha, args.lora_dropout)
    return vldac.Agent(policy, args.temperature), processor


def collect(agent, processor, args, seed=0):
    runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(args.num_envs)], seed)
    return runner, runner.collect(agent, processor, args.num_steps, args.temperature, args.max_new_tokens)


def gae_of(batch, args):
    return vldac.compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated, batch.bootstrap_values,
                             batch.last_values, args.gamma, args.gae_lambda)


def policy_params(agent):
    return {n: p.detach().clone() for n, p in agent.policy.named_parameters()}


# ---- pure functions


def gae_plain_loop(rewards, values, terminated, truncated, bootstrap, last_values, gamma, lam):
    """One env at a time, one step at a time, episode boundaries spelled out."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for e in range(N):
        carry = 0.0
        for t in reversed(range(T)):
            if terminated[t][e]:  # the episode ended: nothing after it
                next_value, carry = 0.0, 0.0
            elif truncated[t][e]:  # a time limit: the truncated state is worth its value
                next_value, carry = bootstrap[t][e], 0.0
            else:
                next_value = last_values[e] if t == T - 1 else values[t + 1][e]
            adv[t][e] = rewards[t][e] + gamma * next_value - values[t][e] + gamma * lam * carry
            carry = adv[t][e]
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    T, N = 9, 4
    rewards, values, bootstrap = (torch.randn(T, N, generator=g) for _ in range(3))
    last_values = torch.randn(N, generator=g)
    terminated = torch.zeros(T, N, dtype=torch.bool)
    truncated = torch.zeros(T, N, dtype=torch.bool)
    terminated[2, 0] = terminated[5, 1] = terminated[8, 2] = True  # 8: at the rollout's last step
    truncated[4, 0] = truncated[3, 2] = truncated[8, 3] = True
    terminated[6, 3] = truncated[6, 3] = True  # both: termination wins (no bootstrap)
    bootstrap = torch.where(truncated & ~terminated, bootstrap, torch.zeros(()))
    adv, ret = vldac.compute_gae(rewards, values, terminated, truncated, bootstrap, last_values, gamma, lam)
    expected = gae_plain_loop(rewards.tolist(), values.tolist(), terminated.tolist(), truncated.tolist(),
                              bootstrap.tolist(), last_values.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, adv + values)


def test_gae_truncation_by_hand():
    """One env: r = 1, 1 | truncated after step 0, V(truncated state) = 10, gamma = 0.5, lambda = 1."""
    values, rewards = torch.tensor([[2.0], [3.0]]), torch.tensor([[1.0], [1.0]])
    truncated = torch.tensor([[True], [False]])
    terminated = torch.tensor([[False], [True]])
    bootstrap = torch.tensor([[10.0], [0.0]])
    adv, _ = vldac.compute_gae(rewards, values, terminated, truncated, bootstrap, torch.tensor([99.0]), 0.5, 1.0)
    assert adv[:, 0].tolist() == [1 + 0.5 * 10 - 2, 1 - 3], adv  # nothing flows from step 1 into step 0


def test_policy_loss_hand_computed():
    """Two steps with 2 and 3 tokens, clip 0.2, clipping active in both; the padding token is absurd."""
    ratios = torch.tensor([[1.5, 0.9, 50.0], [0.5, 1.1, 1.0]])
    old = torch.full((2, 3), -1.0)
    new = old + ratios.log()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    # step 0 (A = 1):  min(1.5, 1.2) = 1.2, min(0.9, 0.9) = 0.9      -> mean 1.05
    # step 1 (A = -2): min(-1.0, -1.6) = -1.6, -2.2, -2.0             -> mean -5.8 / 3
    expected = -(1.05 + (-5.8 / 3)) / 2
    assert vldac.policy_loss(new, old, adv, mask, 0.2).item() == pytest.approx(expected, abs=1e-6)
    # k3 KL: zero where equal; per step, then over steps
    ref = new.clone()
    ref[1, 0] += 1.0  # log(ref / pi) = 1 on one of step 1's three tokens
    assert vldac.kl_penalty(new, ref, mask).item() == pytest.approx((math.e - 2) / 3 / 2, abs=1e-6)


def test_value_loss_clipped_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, -1.0])
    # unclipped 0.5 * mean(1, 1) = 0.5; clipped (eps 0.1): max(1, (0.1 - 2)^2 = 3.61), max(1, 1)
    assert vldac.value_loss(values, old, returns).item() == pytest.approx(0.5)
    assert vldac.value_loss(values, old, returns, 0.1).item() == pytest.approx(0.5 * (3.61 + 1) / 2)


def test_response_mask_through_first_eos():
    eos = torch.tensor([2, 7])
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 8, 9], [7, 2, 2, 0]])
    assert rollout.response_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_bad_inputs_one_line_exit_2(tiny_dir, capsys):
    bad = [dict(env_id="gym_cards/Nope-v0"), dict(minibatch_size=8), dict(minibatch_size=3),
           dict(micro_batch_size=3), dict(total_timesteps=2), dict(temperature=0.0)]
    for overrides in bad:
        with pytest.raises(SystemExit) as exit_info:
            make_args(tiny_dir, **overrides)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, (overrides, err)
    with pytest.raises(SystemExit):
        make_args(tiny_dir, env_id="gym_cards/Nope-v0")
    err = capsys.readouterr().err
    assert all(env_id in err for env_id in envs.ENV_IDS), err
    with pytest.raises(SystemExit) as exit_info:
        vldac.load_policy(str(tiny_dir / "no-such-model"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--model-id tiny" in err, err


# ---- the model: scoring, reference, gradients, updates


def test_scoring_matches_generate(tiny_dir):
    """The rollout's log-probs are those generate() sampled from: same positions, temperature, suppression."""
    args = make_args(tiny_dir, temperature=0.7)
    agent, processor = make_agent(args)
    agent.eval()
    env_list = [envs.make_env(ENV_ID) for _ in range(3)]
    frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt() for env in env_list], "cpu")
    with torch.no_grad():
        out = agent.policy.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=8,
                                    suppress_tokens=agent.suppress_token_ids, eos_token_id=agent.eos_token_ids,
                                    pad_token_id=processor.tokenizer.pad_token_id, output_scores=True,
                                    return_dict_in_generate=True)
        response_ids = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, R)
        mask = rollout.response_mask(response_ids, torch.tensor(agent.eos_token_ids))
        logprobs, _ = agent.get_logprobs_and_value(inputs, response_ids, mask)
    scores = torch.stack(out.scores, 1).log_softmax(-1)  # (B, R, V): processed (temperature, suppression)
    expected = scores.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_first_epoch_ratio_one_and_reference_kl_zero(tiny_dir, lora_r):
    """Re-scoring the stored steps through collate() (other padding, other batches) gives the rollout's
    log-probs and values back, and before any update the reference equals the policy (LoRA: B = 0)."""
    args = make_args(tiny_dir, lora_r=lora_r)
    agent, processor = make_agent(args)
    assert isinstance(agent.policy, vldac.PeftModel) == (lora_r > 0)
    _, batch = collect(agent, processor, args)
    for index in ([0, 1, 2, 3], [3, 0], [2]):
        steps = [batch.steps[i] for i in index]
        inputs, response_ids, mask = rollout.collate(steps, processor.tokenizer.pad_token_id, "cpu")
        old = rollout.pad_stack([batch.logprobs[i] for i in index], response_ids.shape[1])
        ref = rollout.pad_stack([batch.ref_logprobs[i] for i in index], response_ids.shape[1])
        with torch.no_grad():
            logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, mask)
        assert (logprobs - old)[mask].abs().max() < 1e-5  # ratio == 1
        assert (ref - old)[mask].abs().max() < 1e-6 and vldac.kl_penalty(logprobs, ref, mask).abs() < 1e-6
        torch.testing.assert_close(values, batch.values.flatten()[index], atol=1e-5, rtol=1e-5)
    # the update itself: one epoch, one minibatch -> every statistic is taken before the optimizer step
    adv, ret = gae_of(batch, args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    args.update_epochs = 1
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer.pad_token_id)
    assert abs(stats["approx_kl"]) < 1e-9 and abs(stats["old_approx_kl"]) < 1e-5 and stats["clipfrac"] == 0, stats
    assert abs(stats["kl_ref"]) < 1e-6, stats


def test_value_loss_leaves_backbone_without_gradient(tiny_dir):
    args = make_args(tiny_dir)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
    logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, mask)
    vldac.value_loss(values, batch.values.flatten(), torch.randn(4)).backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.policy.parameters())
    assert all(p.grad is not None and p.grad.any() for p in agent.value_head.parameters())


def test_warmup_freezes_policy_then_update_changes_it(tiny_dir):
    args = make_args(tiny_dir, minibatch_size=2, micro_batch_size=1)
    agent, processor = make_agent(args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
    runner, batch = collect(agent, processor, args)
    before, head_before = policy_params(agent), [p.detach().clone() for p in agent.value_head.parameters()]
    for _ in range(2):  # two warm-up iterations, each 2 epochs x 2 minibatches
        adv, ret = gae_of(batch, args)
        vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer.pad_token_id, value_only=True)
        batch = runner.collect(agent, processor, args.num_steps, args.temperature, args.max_new_tokens)
    after = policy_params(agent)
    assert all(torch.equal(before[n], after[n]) for n in before), "warm-up moved policy parameters"
    assert any(not torch.equal(a, p) for a, p in zip(head_before, agent.value_head.parameters()))
    adv, ret = gae_of(batch, args)
    vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer.pad_token_id)
    after = policy_params(agent)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("language_model" in n for n in changed), "a normal update left the policy unchanged"
    assert not any("visual" in n for n in changed), "the vision tower must stay frozen"


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_update_moves_logprob_with_advantage_sign(tiny_dir, advantage):
    """One env step, one plain SGD step: its tokens become more likely with A > 0, less with A < 0."""
    args = make_args(tiny_dir, num_envs=1, num_steps=1, total_timesteps=1, minibatch_size=1, micro_batch_size=1,
                     update_epochs=1, kl_beta=0.0)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    optimizer = torch.optim.SGD([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    adv = torch.full((1, 1), advantage)
    vldac.update(agent, optimizer, batch, adv, adv + batch.values, args, processor.tokenizer.pad_token_id)
    inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logprobs, _ = agent.eval().get_logprobs_and_value(inputs, response_ids, mask)
    change = (logprobs - batch.logprobs[0])[mask].mean().item()
    assert change * advantage > 0, change


def test_lora_update_save_and_reload(tiny_dir, tmp_path):
    """LoRA: an update moves the adapter only; the saved directory reloads (ours and from_pretrained)."""
    args = make_args(tiny_dir, lora_r=4, minibatch_size=2, micro_batch_size=1)
    agent, processor = make_agent(args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    _, batch = collect(agent, processor, args)
    before = policy_params(agent)
    adv, ret = gae_of(batch, args)
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer.pad_token_id)
    assert all(np.isfinite(v) for v in stats.values()), stats
    after = policy_params(agent)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), changed
    vldac.save(tmp_path / "model", agent, processor, args)
    policy, _ = vldac.load_policy(str(tmp_path / "model"))
    assert isinstance(policy, vldac.PeftModel)
    reloaded = dict(policy.named_parameters())
    assert all(torch.equal(after[n], reloaded[n]) for n in changed)
    head = vldac.Agent(policy, 1.0).value_head
    head.load_state_dict(torch.load(tmp_path / "model" / "value_head.pt"))
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), agent.value_head.parameters()))
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "model") is not None
    assert json.loads((tmp_path / "model" / "args.json").read_text())["lora_r"] == 4


# ---- the script, end to end


# 2 envs x 5 steps x 2 iterations: NumberLine truncates at 10 steps, so every env ends an episode
SMOKE = ["--env-id", ENV_ID, "--num-envs", "2", "--num-steps", "5", "--total-timesteps", "20", "--minibatch-size", "5",
         "--micro-batch-size", "5", "--max-new-tokens", "6", "--value-warmup-iters", "1", "--save-model"]
TAGS = ["charts/episodic_return", "charts/success_rate", "charts/episodic_length", "charts/SPS",
        "charts/learning_rate", "charts/parse_failure_rate", "charts/response_tokens", "losses/policy_loss",
        "losses/value_loss", "losses/kl_ref", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac",
        "losses/explained_variance"]


def run_script(cwd, *flags, offline=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1") if offline else env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(HERE / "vldac.py"), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_smoke_run_twice_same_seed(tiny_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        result = run_script(tmp_path / name, *SMOKE, "--model-id", str(tiny_dir), "--seed", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("\niter ") + result.stdout.startswith("iter ") == 2, result.stdout
        (run_dir,) = (tmp_path / name / "runs").iterdir()
        runs.append(run_dir)
    first, second = scalars(runs[0]), scalars(runs[1])
    assert set(TAGS) <= set(first), sorted(set(TAGS) - set(first))
    assert [s for s, _ in first["losses/value_loss"]] == [10, 20], first["losses/value_loss"]  # x-axis: env steps
    for tag in first:
        if tag.startswith("losses/"):
            assert first[tag] == second[tag], tag  # same seed -> identical losses
    model_dir = runs[0] / "model"
    assert (model_dir / "value_head.pt").exists() and (model_dir / "args.json").exists()
    policy, _ = vldac.load_policy(str(model_dir))
    assert not isinstance(policy, vldac.PeftModel)


def test_cli_errors_exit_2(tmp_path):
    result = run_script(tmp_path, "--env-id", "gym_cards/Nope-v0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    # a hub id that cannot be loaded: offline (no network here) or not on the hub; fails fast either way
    start = time.time()
    result = run_script(tmp_path, "--model-id", "nobody/no-such-vlm", "--total-timesteps", "512", offline=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--model-id tiny" in result.stderr and time.time() - start < 60
