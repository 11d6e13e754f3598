"""Tests for alphagrpo.py and reward_server.py, on tiny models built from configs (nothing downloads).

Each test compares against an independent computation (torch.distributions, Monte Carlo, diffusers'
own scheduler, hand-worked examples) or checks a behaviour that a bug would break.
"""
import base64
import contextlib
import dataclasses
import http.client
import io
import json
import math
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import alphagrpo as ag
import reward_server as rs

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class LocalClient:
    """An in-process stand-in for RewardClient: the toy verifier, answered at once."""

    def __init__(self, verifier=None):
        self.verifier = verifier or rs.ToyVerifier()

    def submit(self, images, semantic, quality):
        f = Future()
        f.set_result(rs.score_batch(self.verifier, images, semantic, quality))
        return f


# The tiny random SD3 renderer's task in the tests: one target, "the bottom half is green", in several wordings.
TOY_PROMPTS = [
    {"prompt": p, "semantic_questions": [{"question": "Is the bottom half of the image green?", "tag": "Spatial"}],
     "quality_questions": []}
    for p in ("the bottom half is green", "green grass fills the lower half", "a green meadow at the bottom",
              "a field below the horizon, green")
]


@pytest.fixture(scope="session")
def toy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_models")
    return ag.build_toy_vlm(str(root / "reasoner")), ag.build_toy_sd3(str(root / "renderer"))


def make_policy(toy_dirs, **kw):
    args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], **{**EXTRA_ARGS.get(toy_dirs[0], {}), **kw})
    return ag.load_policy(args, ""), args


def randomize_lora(policy, scale=0.05, seed=1):
    """Non-zero LoRA B, so that a rollout computed with LoRA off could not match a training pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (policy.reasoner.model, policy.renderer.transformer):
            for m in model.modules():
                if isinstance(m, ag.LoRALinear):
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


def png_b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def solid(rgb, size=32, bottom=None):
    im = Image.new("RGB", (size, size), rgb)
    if bottom is not None:
        im.paste(Image.new("RGB", (size, size // 2), bottom), (0, size // 2))
    return im


def serve(verifier, token="", **kw):
    server = ThreadingHTTPServer(("127.0.0.1", 0), rs.make_handler(verifier, token, **kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# --------------------------------------------------------------------------------------------------
# Sec. 3 math
# --------------------------------------------------------------------------------------------------


def test_sde_logprob_matches_torch_normal():
    torch.manual_seed(0)
    v, x = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    x_prev, logp, mean, std_t = ag.sde_step(v, x, sigma, sigma_next, a, second_sigma=0.95)
    # independent: the mean written out, and torch.distributions.Normal for the density
    dt = sigma_next - sigma
    std = a * math.sqrt(sigma / (1 - sigma))
    mu = x + v * dt + std**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    assert torch.allclose(mean, mu, atol=1e-6)
    ref = torch.distributions.Normal(mu, std * math.sqrt(-dt)).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert torch.allclose(logp, ref, atol=1e-5)
    # scoring the sampled x_prev again gives the same log-prob (one function samples and scores)
    _, logp2, _, _ = ag.sde_step(v, x, sigma, sigma_next, a, second_sigma=0.95, prev_sample=x_prev)
    assert torch.equal(logp, logp2)


def test_sde_std_at_t1_uses_second_sigma_only_in_the_denominator():
    v, x = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    _, _, mean, std_t = ag.sde_step(v, x, 1.0, 0.9, 0.5, second_sigma=0.9)
    assert torch.allclose(std_t.flatten(), torch.tensor([0.5 * math.sqrt(1.0 / (1 - 0.9))]))
    assert torch.isfinite(mean).all()
    # Cosmos3's schedule starts at 1 - 1e-6, not 1: the same guard (without it std_t was 1000 a, pure noise)
    _, _, _, std_c = ag.sde_step(v, x, 1 - 1e-6, 0.9, 0.5, second_sigma=0.9)
    assert torch.allclose(std_c.flatten(), torch.tensor([0.5 * math.sqrt((1 - 1e-6) / (1 - 0.9))]))
    _, _, _, std_2 = ag.sde_step(v, x, 0.9, 0.8, 0.5, second_sigma=0.9)  # later steps: t itself
    assert torch.allclose(std_2.flatten(), torch.tensor([0.5 * math.sqrt(0.9 / (1 - 0.9))]))


def test_noise_level_zero_is_exactly_the_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(6)
    torch.manual_seed(0)
    x, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    for i in range(5):
        ours, logp, _, _ = ag.sde_step(v, x, float(sch.sigmas[i]), float(sch.sigmas[i + 1]), 0.0, float(sch.sigmas[1]))
        sch._step_index = i
        theirs = sch.step(v, sch.timesteps[i], x, return_dict=False)[0]
        assert torch.equal(ours, theirs), i
        assert logp is None


def test_scoring_under_zero_std_raises():
    x = torch.randn(1, 2, 2, 2)
    with pytest.raises(ValueError, match="zero std"):
        ag.sde_step(x, x, 0.5, 0.4, 0.0, 0.9, prev_sample=x)


def test_image_kl_matches_monte_carlo():
    torch.manual_seed(0)
    x, v, v_ref = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    _, _, mu, std_t = ag.sde_step(v, x, sigma, sigma_next, a, 0.95)
    _, _, mu_ref, _ = ag.sde_step(v_ref, x, sigma, sigma_next, a, 0.95)
    kl = ag.image_kl(mu, mu_ref, std_t, sigma_next - sigma)
    # Monte Carlo: E_{x ~ pi_theta}[log pi_theta(x) - log pi_ref(x)], per element, 200k samples
    scale = float(std_t.flatten()[0]) * math.sqrt(sigma - sigma_next)
    samples = mu + scale * torch.randn(200_000, *mu.shape[1:])
    p, q = torch.distributions.Normal(mu, scale), torch.distributions.Normal(mu_ref, scale)
    mc = (p.log_prob(samples) - q.log_prob(samples)).mean()
    assert abs(float(kl) - float(mc)) < 0.02 * float(kl)
    # Flow-GRPO's form drops |dt|: ours = theirs / |dt|
    theirs = ag.image_kl(mu, mu_ref, std_t, sigma_next - sigma, flow_grpo_form=True)
    assert torch.allclose(kl * (sigma - sigma_next), theirs, rtol=1e-5)


def test_group_advantages_hand_worked():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 4.0, 0.0])
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 9])  # keyed by id, not by position or prompt string
    A, zero = ag.group_advantages(rewards, ids)
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    expected = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 2 / (2 + 1e-4), -2 / (2 + 1e-4)]
    assert torch.allclose(A, torch.tensor(expected), atol=1e-6)
    assert zero.tolist() == [False, False, False, True, True, False, False]
    # batch-wide std: every group's centred rewards divided by the std of all 7 rewards
    A_b, _ = ag.group_advantages(rewards, ids, std_mode="batch")
    s = float(rewards.double().std(unbiased=False))
    assert math.isclose(float(A_b[0]), -1 / (s + 1e-4), rel_tol=1e-6)
    assert float(A_b[3]) == 0.0


def test_equal_rewards_give_zero_not_nan():
    A, zero = ag.group_advantages(torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0, 0, 0]))
    assert torch.equal(A, torch.zeros(3)) and zero.all()


def test_text_loss_keeps_each_sequence_advantage():
    """The official code multiplies a (B,) ratio with a (B, 1) advantage, a BxB product where every sequence
    gets the batch's mean advantage. Here two sequences with advantages +1 and -1 must be pushed apart."""
    logp = torch.zeros(2, 3, requires_grad=True)
    A = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss, _, _ = ag.text_loss(logp, logp.detach(), None, A, mask, 0.2, 0.28)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises seq 0, lowers seq 1
    # the buggy broadcast, for contrast: every gradient would be 0 (the mean advantage)
    r = torch.exp(logp.detach().flatten() - logp.detach().flatten())
    assert float((r * A.repeat_interleave(3).unsqueeze(1)).mean(0).abs().max()) < 1e-6
    # and the loss value by hand: -mean(r * A) over the 6 tokens = 0
    assert abs(loss.item()) < 1e-7


def test_text_loss_clip_higher_and_masking_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 2.0]]))  # ratios 1.5, 1.5, 0.5 and a masked 2.0
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, _ = ag.text_loss(logp, old, None, torch.tensor([1.0]), mask, 0.2, 0.28)
    # A > 0: min(r, clip(r, 0.8, 1.28)) = 1.28, 1.28, 0.5; the third is not clipped (r < 1, A > 0)
    assert math.isclose(float(loss), -(1.28 + 1.28 + 0.5) / 3, rel_tol=1e-6)
    assert math.isclose(float(clipfrac), 2 / 3, rel_tol=1e-6)
    loss_neg, clipfrac_neg, _ = ag.text_loss(logp, old, None, torch.tensor([-1.0]), mask, 0.2, 0.28)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)): 1.5, 1.5, 0.8
    assert math.isclose(float(loss_neg), (1.5 + 1.5 + 0.8) / 3, rel_tol=1e-6)
    assert math.isclose(float(clipfrac_neg), 1 / 3, rel_tol=1e-6)


def test_text_loss_k3_kl_and_sequence_level_ratio():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -0.3]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, _, kl = ag.text_loss(logp, logp, ref, torch.zeros(2), mask, 0.2, 0.28, beta=0.1)
    d = [-0.5, 1.0, 0.0]
    assert math.isclose(float(kl), sum(math.exp(x) - x - 1 for x in d) / 3, rel_tol=1e-6)
    # GSPO: one ratio per sequence, exp of the mean token log-ratio
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.1, 0.3], [0.2, 5.0]])  # the masked 5.0 must not count
    loss, _, _ = ag.text_loss(new, old, None, torch.tensor([1.0, 1.0]), mask, 10.0, 10.0, seq_level=True)
    r0, r1 = math.exp(0.2), math.exp(0.2)
    assert math.isclose(float(loss), -(r0 * 2 + r1 * 1) / 3, rel_tol=1e-6)


def test_image_loss_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]]))
    A = torch.tensor([10.0, -1.0])  # used as given: the advantages are clipped where they are assigned
    loss, clipfrac = ag.image_loss(logp, old, A, clip=0.1)
    # per step: max(-A r, -A clip(r)): [-10, -10*1.1], [0.9 (r=0.5 -> clip 0.9), 1.0]
    assert math.isclose(float(loss), (-10 - 11 + 0.9 + 1.0) / 4, rel_tol=1e-6)
    assert math.isclose(float(clipfrac), 2 / 4)


def test_text_and_image_share_one_clipped_advantage():
    """Sec. 4.1: one advantage per trajectory drives its text and its image. With the batch-wide std a group of
    spread rewards beside flat ones gets advantages past adv_clip; assign_advantages clips them once, so the
    text loss and the image loss see the same number (Flow-GRPO and the official code clip the image's alone)."""
    args = ag.Args(std_mode="batch", adv_clip=5.0)
    spread = torch.tensor([0.0, 1.0, 0.0, 0.0])
    flat = [torch.full((4,), 0.5) for _ in range(15)]
    groups = [ag.Group(k, "rt2i", {}, None, None, None, rewards=r) for k, r in enumerate([spread] + flat)]
    ag.assign_advantages(groups, args)
    r = torch.cat([spread] + flat).double()
    unclipped = (1.0 - 0.25) / (float(r.std(unbiased=False)) + 1e-4)  # the rewarded sample's, before the clip
    assert unclipped > 5.0  # the case the clip is for
    A = groups[0].advantages
    assert float(A.max()) == 5.0 and float(A.min()) > -5.0
    # both losses at ratio 1 (first update): -A for the text's tokens, -A for the image's steps
    mask = torch.ones(4, 3)
    l_text, _, _ = ag.text_loss(torch.zeros(4, 3), torch.zeros(4, 3), None, A, mask, 0.2, 0.28)
    l_img, _ = ag.image_loss(torch.zeros(4, 2), torch.zeros(4, 2), A, 1e-4)
    assert math.isclose(float(l_text), float(l_img), abs_tol=1e-6)
    assert math.isclose(float(l_text), -float(A.mean()), abs_tol=1e-6)


def test_fpr_hand_worked_groups():
    refined = torch.tensor([0.6, 0.5, 0.4, 0.7])
    r, failed = ag.false_positive_rectification(refined, init_reward=0.5)
    assert r.tolist() == pytest.approx([0.6, 0.5, 0.5, 0.7]) and failed.tolist() == [False, True, True, False]
    r, _ = ag.false_positive_rectification(refined, init_reward=0.5, value="group-min")
    assert r.tolist() == pytest.approx([0.6, 0.4, 0.4, 0.7])
    # after rectification every failed refinement has a negative advantage
    A, _ = ag.group_advantages(ag.false_positive_rectification(refined, 0.5)[0], torch.zeros(4))
    assert (A[failed] < 0).all() and (A[~failed] > 0).all()
    # without FPR the tie at 0.5 would have been pushed up relative to the 0.4
    r, failed = ag.false_positive_rectification(torch.tensor([0.3, 0.2, 0.3]), init_reward=0.3)
    assert failed.all() and r.tolist() == pytest.approx([0.3] * 3)  # all failed: equal rewards, advantage 0
    A, zero_std = ag.group_advantages(r, torch.zeros(3))
    assert A.tolist() == [0.0] * 3 and zero_std.all()


# --------------------------------------------------------------------------------------------------
# LoRA and the models
# --------------------------------------------------------------------------------------------------


def test_lora_zero_init_disable_and_merge():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    x = torch.randn(3, 6)
    base = model(x)
    params = ag.add_lora(model, "0,2", rank=2, alpha=4.0)
    assert len(params) == 4 and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert torch.equal(model(x), base)  # B = 0 at init
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    assert not torch.allclose(model(x), base)
    with ag.lora_disabled(model):
        assert torch.equal(model(x), base)
    # merging W + (alpha / r) B A by hand gives the same function
    l0 = model[0]
    merged = torch.nn.Linear(6, 5)
    with torch.no_grad():
        merged.weight.copy_(l0.base.weight + l0.scale * l0.lora_B.weight @ l0.lora_A.weight)
        merged.bias.copy_(l0.base.bias)
    assert torch.allclose(model[0](x), merged(x), atol=1e-6)


def test_toy_models_round_trip(toy_dirs, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm = AutoModelForImageTextToText.from_pretrained(toy_dirs[0])
    torch.manual_seed(0)
    again = ag.build_toy_vlm(str(tmp_path / "again"))
    vlm2 = AutoModelForImageTextToText.from_pretrained(again)
    assert type(vlm).__name__ == "Qwen3VLForConditionalGeneration"
    sd1, sd2 = vlm.state_dict(), vlm2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # deterministic build
    proc = AutoProcessor.from_pretrained(toy_dirs[0])
    ids = proc.tokenizer("Is the bottom half green?")["input_ids"]
    assert proc.tokenizer.decode(ids) == "Is the bottom half green?" and proc.tokenizer.unk_token_id not in ids
    pipe = StableDiffusion3Pipeline.from_pretrained(toy_dirs[1])
    t, vae = pipe.transformer.config, pipe.vae.config
    # the real SD3.5-medium fields the toy keeps
    assert (t.in_channels, t.qk_norm, tuple(t.dual_attention_layers)) == (16, "rms_norm", (0,))
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert pipe.vae_scale_factor == 8 and pipe.scheduler.config.shift == 3.0


def rollout(policy, args, task="rt2i", seed=0, row=None):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    row = row or TOY_PROMPTS[0]
    sigmas = policy.renderer.sigmas(args.num_steps)
    init = None
    if task == "srr":
        images, fut = ag.initial_candidates(policy, row, args, gen, LocalClient())
        image, reward = ag.pick_initial(images, fut.result()["rewards"], "min", gen)
        init = (image, policy.renderer.encode_image(image), reward)
    g = ag.rollout_group(policy, row, task, args, gen, LocalClient(), sigmas, init, index=seed)
    ag.collect_rewards_and_fpr(g, args)
    ag.assign_advantages([g], args)
    return g


def current_logps(policy, g, args):
    """Text (G, L) and image (G, W) log-probs of the stored rollout under the current weights."""
    return ag.group_logps(policy, g, args)[:2]


def test_first_update_ratio_is_exactly_one_with_nonzero_lora(toy_dirs):
    policy, args = make_policy(toy_dirs, group_size=4)
    randomize_lora(policy)
    g = rollout(policy, args)
    with torch.no_grad():
        text, image = current_logps(policy, g, args)
    assert torch.equal(text * g.text.mask, g.text.old_logp * g.text.mask)
    assert torch.equal(image, g.image.old_logp)
    # a rollout computed with LoRA off would not match: the check above has teeth
    with torch.no_grad(), ag.lora_disabled(policy.reasoner.model, policy.renderer.transformer):
        text_off, image_off = current_logps(policy, g, args)
    assert not torch.allclose(text_off * g.text.mask, g.text.old_logp * g.text.mask)
    assert not torch.allclose(image_off, g.image.old_logp)
    # and group_loss sees ratio 1: nothing is clipped
    loss, stats = ag.group_loss(policy, g, args)
    assert stats["text_clipfrac"] == 0 and stats["image_clipfrac"] == 0


def test_generation_is_plain_temperature_sampling(toy_dirs):
    """generate() must not apply top-p/top-k: its processed scores equal the raw logits / T, and the
    teacher-forced log-probs equal the sampler's own, so the stored log-probs are on-policy."""
    policy, args = make_policy(toy_dirs, temperature=0.7)
    r = policy.reasoner
    inputs = r.chat_inputs("the bottom half is green", None, 3)
    out = r.model.generate(**inputs, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=5,
                           suppress_tokens=r.banned, output_scores=True, output_logits=True, return_dict_in_generate=True)
    for scores, logits in zip(out.scores, out.logits):
        ref = logits / 0.7
        ref[:, r.banned] = float("-inf")  # the placeholder tokens, masked the same way by token_logprobs
        assert torch.allclose(scores.log_softmax(-1), ref.log_softmax(-1), atol=1e-5)
    ro = r.generate("the bottom half is green", None, 3)
    assert ro.ids.shape[0] == 3 and ro.mask.sum() > 0
    assert r.model.generation_config.top_p is None or r.model.generation_config.top_p == 1.0


def test_one_update_moves_logprobs_with_the_advantage(toy_dirs):
    """After one update sum_i A_i * delta_logp_i > 0; with one trajectory, sign(delta_logp) = sign(A).
    Checked for the text and the image part separately."""
    policy, args = make_policy(toy_dirs, group_size=6, lr=1e-3, updates_per_rollout=1)
    g = rollout(policy, args, seed=3)
    assert g.advantages.abs().sum() > 0
    params = policy.reasoner.lora_params + policy.renderer.lora_params
    opt = torch.optim.SGD(params, lr=1e-2)
    with torch.no_grad():
        t0, i0 = current_logps(policy, g, args)
    loss, _ = ag.group_loss(policy, g, args)
    loss.backward()
    opt.step()
    with torch.no_grad():
        t1, i1 = current_logps(policy, g, args)
    d_text = ((t1 - t0) * g.text.mask).sum(1)
    d_image = (i1 - i0).sum(1)
    assert float((g.advantages * d_text).sum()) > 0
    assert float((g.advantages * d_image).sum()) > 0
    for sign in (1.0, -1.0):  # a single trajectory with A = +1 or -1
        policy, args = make_policy(toy_dirs, group_size=1)
        g = rollout(policy, args, seed=4)
        g.advantages = torch.tensor([sign])
        params = policy.reasoner.lora_params + policy.renderer.lora_params
        opt = torch.optim.SGD(params, lr=1e-2)
        with torch.no_grad():
            t0, i0 = current_logps(policy, g, args)
        ag.group_loss(policy, g, args)[0].backward()
        opt.step()
        with torch.no_grad():
            t1, i1 = current_logps(policy, g, args)
        assert math.copysign(1, float(((t1 - t0) * g.text.mask).sum())) == sign
        assert math.copysign(1, float((i1 - i0).sum())) == sign


# --------------------------------------------------------------------------------------------------
# Prompt rows
# --------------------------------------------------------------------------------------------------


def test_load_prompts_rejects_bad_rows_with_line_numbers(tmp_path):
    good = {"prompt": "a cat", "split": "train", "task": "t", "difficulty": "easy",
            "semantic_questions": [{"question": "Is there a cat?", "tag": "Existence"}], "quality_questions": []}
    cases = [
        ({**good, "prompt": ""}, "empty"),
        ({k: v for k, v in good.items() if k != "semantic_questions"}, "'semantic_questions' is missing"),
        ({**good, "semantic_questions": []}, "no semantic question"),
        ({**good, "semantic_questions": [{"question": "Is there a cat?", "tag": "Colour"}]}, "unknown tag 'Colour'"),
        ({**good, "quality_questions": "Is it sharp?"}, "not a list"),
        ({**good, "split": 3}, "'split' must be a string"),
    ]
    for row, reason in cases:
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=f"p.jsonl:2: .*{reason}"):
            ag.load_prompts(str(path))
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:2: not valid JSON"):
        ag.load_prompts(str(path))


def test_load_prompts_reads_the_official_format(tmp_path):
    path = tmp_path / "official.jsonl"
    rows = [{"prompt": "a red apple", "semantic_questions": ["Is there an apple?", "Is the apple red?"],
             "quality_questions": ["Is the apple round?"]},
            {"prompt": "two dogs", "semantic_questions": [{"question": "Are there two dogs?", "tag": "Count"}],
             "quality_questions": [{"question": "Do both dogs have four legs?", "tag": "Anatomy"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = ag.load_prompts(str(path), split="train")
    assert [r["prompt"] for r in got] == ["a red apple", "two dogs"]
    assert got[0]["semantic_questions"][1] == {"question": "Is the apple red?", "tag": None}
    assert got[1]["quality_questions"][0]["tag"] == "Anatomy"


# --------------------------------------------------------------------------------------------------
# The reward server (Sec. 4.2)
# --------------------------------------------------------------------------------------------------


def test_toy_verifier_is_graded_and_strict():
    v = rs.ToyVerifier()
    q = "Is the bottom half of the image green?"
    green_bottom = solid((128, 128, 128), bottom=(0, 255, 0))
    greenish = solid((128, 128, 128), bottom=(60, 200, 60))
    red_bottom = solid((0, 255, 0), bottom=(255, 0, 0))
    s_full, s_half, s_red = (v.score(im, [q])[0] for im in (green_bottom, greenish, red_bottom))
    assert s_full > s_half > 0.5 > s_red  # graded by the colour margin, not a constant
    # by hand: bottom mean (0,1,0): distance to green 0, nearest other colour grey (0.5,0.5,0.5) at sqrt(3)/2
    assert math.isclose(s_full, 1 / (1 + math.exp(-rs.ToyVerifier.GAIN * math.sqrt(3) / 2)), rel_tol=1e-9)
    # grey is a colour of its own, not "maybe green": a policy drawing grey-ish hedges earns nothing
    assert max(v.score(solid((128, 128, 128)), [f"Is the image {c}?" for c in ("green", "white", "red")])) < 0.01
    assert v.score(solid((0, 0, 255)), ["is the image MOSTLY blue?"])[0] > 0.99  # case-insensitive
    for bad in ("Is the cat green?", "Is the bottom half of the image mauve?", "green?"):
        with pytest.raises(rs.BadRequest):
            v.score(green_bottom, [bad])


def test_dvreward_is_the_geometric_mean():
    assert math.isclose(rs.dvreward([0.9, 0.5], [0.4]), math.sqrt(0.7 * 0.4))
    assert rs.dvreward([], []) == 1.0 and math.isclose(rs.dvreward([0.25], []), 0.5)
    assert math.isclose(rs.confidence([0.0, math.log(3)], [math.log(4)]), 4 / 8)  # (1 + 3) / (1 + 3 + 4)


def test_server_scores_and_rejects_bad_requests():
    with serving(rs.ToyVerifier()) as (url, _):
        assert requests.get(f"{url}/health").json()["status"] == "ok"
        im = png_b64(solid((0, 255, 0)))
        q = "Is the image mostly green?"
        good = {"images": [im, im], "semantic_questions": [[q], [q]], "quality_questions": [[], [q]]}
        r = requests.post(f"{url}/score", json=good)
        assert r.status_code == 200
        got = r.json()
        s = rs.ToyVerifier().score(solid((0, 255, 0)), [q])[0]
        assert got["rewards"] == pytest.approx([math.sqrt(s * 1.0), s])  # empty list scores 1.0
        assert got["semantic_scores"] == [[pytest.approx(s)], [pytest.approx(s)]]
        bad = [
            ({"images": [im]}, "'semantic_questions' is missing"),
            ({**good, "images": ["not base64!"] * 2}, "not valid base64"),
            ({**good, "images": [base64.b64encode(b"GIF89a").decode()] * 2}, "not a PNG"),
            ({**good, "images": [base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()] * 2}, "broken PNG"),
            ({**good, "semantic_questions": [[q]]}, "1 lists for 2 images"),
            ({**good, "semantic_questions": [[q], [3]]}, "non-empty strings"),
            ({**good, "semantic_questions": [["Is the cat green?"], [q]]}, "cannot answer"),
            ([1, 2], "JSON object"),
        ]
        for body, msg in bad:
            r = requests.post(f"{url}/score", json=body)
            assert r.status_code == 400 and msg in r.json()["error"], (body, r.text)
        r = requests.post(f"{url}/score", data=b"{oops", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        assert requests.get(f"{url}/nope").status_code == 404
        assert "error" in requests.post(f"{url}/nope", json={}).json()
        assert requests.post(f"{url}/score", json=good).json()["rewards"] == pytest.approx([math.sqrt(s), s])


def test_transformers_verifier_over_http_matches_its_logits(toy_dirs):
    """The tiny random Qwen3-VL loaded from disk as a verifier; each score must equal P(yes)/(P(yes)+P(no))
    computed here from the same model's logits, one question at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = solid((30, 200, 60), bottom=(200, 30, 60))
    qs = ["Is the image mostly green?", "Is the top half of the image red?", "Is the image bright?"]
    body = {"images": [png_b64(image)], "semantic_questions": [qs[:2]], "quality_questions": [qs[2:]]}
    with serving(rs.TransformersVerifier(toy_dirs[0], device="cpu", dtype="float32")) as (url, _):
        got = requests.post(f"{url}/score", json=body).json()
    model = AutoModelForImageTextToText.from_pretrained(toy_dirs[0]).eval()
    proc = AutoProcessor.from_pretrained(toy_dirs[0])
    yes = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "yes")]
    no = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("No", "no")]
    expected = []
    for q in qs:
        msgs = [{"role": "system", "content": rs.STRICT_AUDITOR},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        with torch.no_grad():
            p = model(**proc(text=[text], images=[image], return_tensors="pt")).logits[0, -1].softmax(-1)
        expected.append(float(p[yes].sum() / (p[yes].sum() + p[no].sum())))
    assert got["semantic_scores"][0] + got["quality_scores"][0] == pytest.approx(expected, abs=1e-5)
    assert got["rewards"][0] == pytest.approx(math.sqrt((expected[0] + expected[1]) / 2 * expected[2]), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class SlowVerifier(rs.ToyVerifier):
    name = "slow"

    def score(self, image, questions):
        time.sleep(0.25)  # x 4 images = 1 s per request
        return super().score(image, questions)


def test_scoring_overlaps_sampling(toy_dirs, tmp_path):
    server, url = serve(SlowVerifier())
    try:
        args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=4, groups_per_step=3, steps=1,
                       reward_url=url, out=str(tmp_path / "run"), sample_every=0, eval_every=0, save_every=0)
        ag.train(args)
    finally:
        server.shutdown()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    sampling = row["time_reason"] + row["time_render"]
    scoring = 3 * 1.0  # three requests of four images, 1 s each, answered one after another
    # sequential would be sampling + scoring + training; overlapped, the wait is less than the scoring
    assert row["time_step"] - row["time_train"] < sampling + scoring
    assert row["time_reward_wait"] < scoring


def test_metrics_rows_have_every_key_and_no_nan(toy_dirs, tmp_path):
    args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=4, groups_per_step=2, steps=3,
                   out=str(tmp_path / "run"), sample_every=1, eval_every=2, save_every=2, beta_text=0.01,
                   beta_image=0.01)
    ag.train(args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "reward_mean", "reward_std", "zero_std_frac", "text_loss", "image_loss", "text_clipfrac",
            "image_clipfrac", "text_kl", "image_kl", "time_reason", "time_render", "time_reward_wait", "time_train",
            "score_Spatial", "eval_reward"}
    keys |= {"eval_forced_plan", "eval_forced_plan_implicit"}
    assert len(rows) == 4 and all(keys <= set(r) for r in rows) and all(r.keys() == rows[0].keys() for r in rows)
    assert all(v is None or isinstance(v, (int, float)) and math.isfinite(v) for r in rows for v in r.values())
    assert rows[0]["text_kl"] is not None and rows[0]["image_kl"] is not None
    # evaluated before steps 0 and 2's updates, and after the last: a row of its own (step 3 = --steps)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["eval_reward"] is None for r in rows] == [False, True, False, False]
    assert rows[3]["reward_mean"] is None and rows[3]["eval_forced_plan"] is not None  # the toy world's test rows
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert saved["group_size"] == 4 and "git_commit" in saved
    assert (tmp_path / "run" / "samples" / "step_000001.png").exists()
    assert (tmp_path / "run" / "eval" / "step_000003.png").exists()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_000002", "step_000003"]


def test_the_first_evaluation_comes_before_any_update(toy_dirs, tmp_path):
    """Step 0's evaluation is the policy before any update: two runs that differ only in their learning rates
    agree on it exactly, and differ after their update (the last row, step 1 = --steps)."""
    evals = []
    for lr in (1e-5, 3e-2):
        args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=4, groups_per_step=2, steps=1,
                       lr=lr, reasoner_lr=lr, out=str(tmp_path / str(lr)), sample_every=0, eval_every=1,
                       save_every=0)
        ag.train(args)
        rows = [json.loads(line) for line in (tmp_path / str(lr) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        evals.append([r["eval_reward"] for r in rows])
    assert evals[0][0] == evals[1][0] and evals[0][1] != evals[1][1]


def test_forced_plan_draws_the_plan_that_names_the_target(toy_dirs, monkeypatch):
    """The forced-plan probe draws every test row that has a target with its right plan in place of the
    reasoner's ("<colour> <region>" after the prompt), at noise seeded by the row's index, and its rewards are
    the verifier's on exactly those images."""
    policy, args = make_policy(toy_dirs)
    r = policy.renderer
    rows = {k: row for k, row in enumerate(ag.TOY_WORLD_PROMPTS) if row["split"] == "test"}
    rows = {k: rows[k] for k in list(rows)[::6]} | {99: TOY_PROMPTS[0]}  # and a row without a target
    seen = []
    encode = r.encode
    monkeypatch.setattr(r, "encode", lambda texts, **kw: seen.append(texts) or encode(texts, **kw))
    forced = ag.forced_plan(policy, rows, args, LocalClient())
    with_target = [(k, row) for k, row in rows.items() if row.get("target")]
    assert seen == [[f"{row['prompt']}. {row['target']['colour']} {row['target']['region']}"
                     for _, row in with_target]]
    assert [kind for kind, _ in forced] == [row["kind"] for _, row in with_target]
    monkeypatch.undo()
    k, row = with_target[1]
    with torch.no_grad():
        x0 = ag.render(r, r.encode(seen[0][1:2]), r.noise(1, torch.Generator().manual_seed(k)),
                       r.sigmas(args.eval_num_steps), range(0), 0.0)[0]
    image = r.decode(x0)[0]
    expected = LocalClient().submit([image], *([q] for q in ag.questions(row))).result()["rewards"][0]
    assert math.isclose(forced[1][1].result()["rewards"][0], expected, abs_tol=1e-6)


def test_default_run_learns(tmp_path):
    """`python alphagrpo.py` as a subprocess (the toy world, its reward server on a free port): the reward rises
    (mean of the last 5 steps >= first 5 + 0.05) and the reasoner learns the implicit prompts' targets
    (plan_accuracy_implicit, last 10 steps >= first 10 + 0.2), and the run ends with the trained policy's
    evaluation. Measured on 2 cores, seeds 0, 1, 2 (README): reward 0.176 -> 0.562, 0.130 -> 0.415, 0.208 -> 0.403;
    plan accuracy 0.17 -> 0.61, 0.16 -> 0.36, 0.20 -> 0.38 (this test runs seed 0)."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, os.path.join(HERE, "alphagrpo.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == ag.Args().steps + 1 and rows[-1]["eval_reward"] is not None  # the final evaluation
    rows = rows[:-1]

    def mean(key, part):
        return sum(r[key] for r in rows[part]) / len(rows[part])

    reward = [round(r["reward_mean"], 2) for r in rows]
    assert mean("reward_mean", slice(-5, None)) >= mean("reward_mean", slice(0, 5)) + 0.05, reward
    plans = [round(r["plan_accuracy_implicit"], 2) for r in rows]
    assert mean("plan_accuracy_implicit", slice(-10, None)) >= mean("plan_accuracy_implicit", slice(0, 10)) + 0.2, plans
    assert Image.open(out / "curves.png").size == (720, 480)


# --------------------------------------------------------------------------------------------------
# Self-Reflective Refinement (Sec. 4.1) and inference
# --------------------------------------------------------------------------------------------------


def test_sdedit_strength_zero_returns_the_initial_latents_exactly():
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    x_init, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    start, x = ag.sdedit_start(x_init, noise, sigmas, 0.0)
    assert start == 4 and torch.equal(x, x_init)
    start, x = ag.sdedit_start(x_init, noise, sigmas, 1.0)
    assert start == 0 and torch.equal(x, noise)
    start, x = ag.sdedit_start(x_init, noise, sigmas, 0.5)  # x_t = (1 - t) x_0 + t eps at t = sigmas[2]
    assert start == 2 and torch.allclose(x, 0.25 * x_init + 0.75 * noise)


def test_srr_initial_image_gets_no_gradient(toy_dirs):
    policy, args = make_policy(toy_dirs, group_size=4, srr_strength=0.75)
    randomize_lora(policy)
    row = TOY_PROMPTS[0]
    gen = torch.Generator().manual_seed(0)
    images, fut = ag.initial_candidates(policy, row, args, gen, LocalClient())
    image, reward = ag.pick_initial(images, fut.result()["rewards"], "min", gen)
    assert reward == min(fut.result()["rewards"])  # the worst candidate is kept
    init_latents = policy.renderer.encode_image(image).requires_grad_(True)
    g = ag.rollout_group(policy, row, "srr", args, gen, LocalClient(), policy.renderer.sigmas(args.num_steps),
                         (image, init_latents, reward))
    ag.collect_rewards_and_fpr(g, args)
    ag.assign_advantages([g], args)
    assert g.init_image is image and g.image.latents.shape[1] >= 2  # refined from the init, with trained steps
    loss, _ = ag.group_loss(policy, g, args)
    loss.backward()
    assert init_latents.grad is None  # the shared initial image is context, not a trained trajectory
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.renderer.lora_params)


def test_fpr_dropped_group_leaves_the_update_unchanged(toy_dirs):
    """A group dropped from the loss (a step where no refinement improved) leaves it and its denominator:
    updating on [live, dropped] must give exactly the weights of updating on [live] alone."""
    results = []
    for with_dropped in (True, False):
        policy, args = make_policy(toy_dirs, group_size=4, updates_per_rollout=1)
        live = rollout(policy, args, seed=1)
        groups = [live]
        if with_dropped:
            dropped = rollout(policy, args, seed=2)
            dropped.skip = True
            groups.append(dropped)
        opt = torch.optim.AdamW(policy.reasoner.lora_params + policy.renderer.lora_params, lr=1e-2)
        ag.update(policy, opt, groups, args, __import__("random").Random(0))
        results.append([p.detach().clone() for p in policy.reasoner.lora_params + policy.renderer.lora_params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def failed_srr_group(policy, args, seed):
    """A group whose every refinement failed: the initial image scored above all of them."""
    g = rollout(policy, args, seed=seed)
    g.task, g.init_reward = "srr", 1.0 + 1e-3  # no toy reward reaches it
    return g


def test_fpr_all_failed_group_has_zero_gradient_but_counts_in_the_denominator(toy_dirs):
    """Official FPR: a group where every refinement failed stays in the loss with advantage 0 (another SRR
    group of the step improved), so the step's loss is (L_live + 0) / 2. With SGD at lr 1 (no clip) the update
    must be exactly -grad(L_live) / 2, computed by hand from the live group alone; dropping the group instead
    would give -grad(L_live)."""
    policy, args = make_policy(toy_dirs, group_size=4, updates_per_rollout=1, groups_per_step=2, task="mix",
                               grad_clip=1e9, srr_init="candidates")
    randomize_lora(policy)
    live = failed_srr_group(policy, args, seed=1)
    live.init_reward = -1.0  # every refinement of this one improved
    failed = failed_srr_group(policy, args, seed=2)
    live.index, failed.index = 0, 1
    for g in (live, failed):
        ag.collect_rewards_and_fpr(g, args)
    ag.skip_unimproved_step([live, failed], args)
    ag.assign_advantages([live, failed], args)
    assert not failed.skip and failed.failed.all() and failed.advantages.tolist() == [0.0] * 4
    assert live.advantages.abs().sum() > 0
    params = policy.reasoner.lora_params + policy.renderer.lora_params
    loss, _ = ag.group_loss(policy, live, args)  # by hand: the live group's gradient
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    expected = [p.detach() - (0 if g is None else g) / 2 for p, g in zip(params, grads)]
    assert any(not torch.equal(p, e) for p, e in zip(params, expected))  # the live group moves the weights
    stats = ag.update(policy, torch.optim.SGD(params, lr=1.0), [live, failed], args, __import__("random").Random(0))
    assert len(stats) == 2  # both groups were in the loss
    assert all(torch.allclose(p, e, atol=1e-7, rtol=0) for p, e in zip(params, expected))


def test_fpr_skips_the_srr_share_only_when_no_refinement_of_the_step_improved(toy_dirs):
    policy, args = make_policy(toy_dirs, group_size=4, task="mix", groups_per_step=4, srr_init="candidates")
    failed = [failed_srr_group(policy, args, seed=s) for s in (1, 2)]
    improving = failed_srr_group(policy, args, seed=3)
    improving.init_reward = -1.0  # every refinement beats it
    rt2i = rollout(policy, args, seed=4)
    for g in failed + [improving, rt2i]:
        ag.collect_rewards_and_fpr(g, args)
    ag.skip_unimproved_step(failed + [rt2i], args)  # no SRR group of the step improved: their share is skipped
    assert [g.skip for g in failed + [rt2i]] == [True, True, False]
    for g in failed:
        g.skip = False
    ag.skip_unimproved_step(failed + [improving, rt2i], args)  # one improved: all stay, the failed with A = 0
    assert not any(g.skip for g in failed + [improving, rt2i])
    rows = [ag.summarize(g) for g in failed + [improving]]
    row = ag.metrics_row(0, rows, [], 0.0, dict.fromkeys(("reason", "render", "reward_wait", "train", "step"), 0.0),
                         [], args)
    assert row["all_failed_frac"] == pytest.approx(2 / 3) and row["skipped_frac"] == 0.0


def test_mix_refines_the_worst_image_of_the_same_prompts_rt2i_group(toy_dirs, capsys):
    """--task mix (official): SRR group k refines the lowest-rewarded image of RT2I group k + n_srr, which
    drew the same prompt with a plan in the same step; --srr-init candidates draws its own."""
    timers = dict.fromkeys(("reason", "render", "reward_wait"), 0.0)
    policy, args = make_policy(toy_dirs, group_size=4, task="mix", groups_per_step=4)
    rows = TOY_PROMPTS
    groups = ag.rollout_step(policy, 3, rows, args, LocalClient(), policy.renderer.sigmas(args.num_steps), timers)
    assert [g.task for g in groups] == ["srr", "srr", "rt2i", "rt2i"] and [g.index for g in groups] == [0, 1, 2, 3]
    for srr, rt2i in ((groups[0], groups[2]), (groups[1], groups[3])):
        rewards = rt2i.reward_future.result()["rewards"]
        worst = min(range(4), key=rewards.__getitem__)
        assert srr.row is rt2i.row and srr.init_reward == min(rewards)
        assert srr.init_image is rt2i.image.images[worst]
    assert groups[2].row is not groups[3].row  # two prompts, each in both tasks
    args.srr_init = "candidates"
    groups = ag.rollout_step(policy, 3, rows, args, LocalClient(), policy.renderer.sigmas(args.num_steps), timers)
    assert all(groups[k].init_image not in groups[j].image.images for k in (0, 1) for j in (2, 3))
    assert len({id(g.row) for g in groups}) == 4  # four prompts: the SRR groups draw their own candidates
    with pytest.raises(SystemExit):
        ag.parse_args(["--task", "mix", "--mix-ratio", "0.75"])
    assert "more than the RT2I ones" in capsys.readouterr().err
    assert ag.parse_args(["--task", "mix", "--mix-ratio", "0.75", "--srr-init", "candidates"])[1].mix_ratio == 0.75


def test_srr_and_mix_rows_carry_the_refinement_metrics(toy_dirs, tmp_path):
    for task in ("srr", "mix"):
        args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], task=task, group_size=4, groups_per_step=2,
                       steps=2, srr_strength=0.75, out=str(tmp_path / task), sample_every=1, eval_every=0,
                       save_every=0)
        ag.train(args)
        rows = [json.loads(line) for line in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            assert 0 <= r["improved_frac"] <= 1 and 0 <= r["fpr_frac"] <= 1 and 0 <= r["skipped_frac"] <= 1
            assert r["reward_init_mean"] is not None and r["reward_refined_mean"] is not None
            # with FPR, every refinement either improved or was rectified
            assert math.isclose(r["improved_frac"] + r["fpr_frac"], 1.0, abs_tol=1e-9)
        assert (tmp_path / task / "samples" / "step_000001.png").exists()


def test_sample_command_refines(tmp_path):
    out = tmp_path / "sample"
    res = subprocess.run([sys.executable, os.path.join(HERE, "alphagrpo.py"), "sample", "--prompt",
                          "a green bottom half", "--refine-rounds", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(isinstance(r["reward"], float) and 0 <= r["reward"] <= 1 for r in rounds)
    assert all((out / r["image"]).exists() for r in rounds) and (out / "side_by_side.png").exists()
    # the rewards are the server's scores of the written images
    v = rs.ToyVerifier()
    for r in rounds:
        s = v.score(Image.open(out / r["image"]), ["Is the bottom half of the image green?"])[0]
        assert r["reward"] == pytest.approx(math.sqrt(s), abs=1e-6)


def test_rounds_summary_by_hand(tmp_path, capsys):
    row = lambda kind: {"kind": kind}  # noqa: E731

    def rounds(rewards, refined, least):  # round 0's least confident question; whether rounds 1, 2 refined
        return [{"reward": r, "refined": f, "least_confidence": least if k == 0 else None}
                for k, (r, f) in enumerate(zip(rewards, [None] + refined))]

    results = [(row("explicit"), rounds((1.0, 0.2, 1.0), [True, True], 0.9)),  # right at round 0
               (row("explicit"), rounds((0.5, 0.5, 0.9), [False, True], 0.4)),  # kept by round 1
               (row("implicit"), rounds((0.2, 0.8, 0.1), [True, True], 0.1)),
               (None, rounds((None, None, None), [True, True], None))]
    got = ag.rounds_summary(str(tmp_path), results)
    assert got["explicit"] == {"prompts": 2, "reward": [0.75, 0.35, 0.95], "worse": [0.5, 0.0], "better": [0.0, 0.5]}
    assert got["implicit"] == {"prompts": 1, "reward": [0.2, 0.8, 0.1], "worse": [0.0, 1.0], "better": [1.0, 0.0]}
    assert got["all"]["prompts"] == 3 and got["all"]["worse"] == [pytest.approx(1 / 3, abs=1e-4)] * 2
    third = pytest.approx(1 / 3, abs=1e-4)
    assert got["rounds"] == [
        {"round": 1, "refined": pytest.approx(2 / 3, abs=1e-4), "kept": third, "better": third, "worse": third,
         "right": 1, "right_made_worse": 1.0},
        {"round": 2, "refined": 1.0, "kept": 0.0, "better": pytest.approx(2 / 3, abs=1e-4), "worse": third,
         "right": 1, "right_made_worse": 0.0}]
    assert json.loads((tmp_path / "rounds_summary.json").read_text())["explicit"] == got["explicit"]
    printed = capsys.readouterr().out
    assert "| explicit (2) | 0.750 | 0.350 | 0.950 | 0.50 / 0.00 | 0.00 / 0.50 |" in printed
    assert "| 1 | 0.67 | 0.33 | 0.33 / 0.33 | 1.00 (of 1) |" in printed


def test_wants_refinement_by_hand(capsys):
    scores = {"rewards": [0.6, 0.3], "semantic_scores": [[0.9, 0.4], [0.7]], "quality_scores": [[0.8], []]}
    assert ag.wants_refinement("", None)  # no gate: every image
    assert not ag.wants_refinement("0.5", scores, 0) and ag.wants_refinement("0.5", scores, 1)
    assert not ag.wants_refinement("0.6", scores, 0)  # R < TAU, strictly
    assert ag.wants_refinement("question", scores, 0) and not ag.wants_refinement("question", scores, 1)
    for flags, message in ((["sample", "--prompt", "x", "--refine-below", "most"], "takes a reward TAU"),
                           (["eval", "--benchmark", "wise", "--data", "d", "--refine-rounds", "2",
                             "--refine-only-wrong", "r"], "it takes --refine-rounds 1"),
                           (["eval", "--benchmark", "wise", "--data", "d", "--refine-rounds", "1",
                             "--refine-only-wrong", "r", "--refine-below", "0.5"], "no --refine-below")):
        with pytest.raises(SystemExit):
            ag.parse_args(flags)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs its questions"):  # no DVReward questions for this prompt
        ag.main(["sample", "--prompt", "a prompt of no prompt set", "--refine-below", "0.5", "--out",
                 os.devnull + "-never"])


def test_the_verifier_gate_keeps_what_passes_and_refines_the_rest(tmp_path):
    """`sample --refine-below TAU`: a round refines exactly the images whose reward is below TAU; a kept one
    is the same file, the same reward and no reflection, in every later round too."""
    out = tmp_path / "gated"
    ag.main(["sample", "--test-prompts", "--refine-rounds", "2", "--refine-below", "0.5", "--out", str(out)])
    kept = refined = 0
    v = rs.ToyVerifier()
    for i in range(24):
        folder = out / f"{i:03d}"
        saved = json.loads((folder / "rounds.json").read_text())
        rows = [r for r in ag.TOY_WORLD_PROMPTS if r["prompt"] == saved["prompt"]]
        for k in (1, 2):
            before, now = saved["rounds"][k - 1], saved["rounds"][k]
            assert now["refined"] == (before["reward"] < 0.5)
            if now["refined"]:
                refined += 1
                assert now["text"]  # a reflection was written
            else:
                kept += 1
                assert (folder / f"round_{k}.png").read_bytes() == (folder / f"round_{k - 1}.png").read_bytes()
                assert now["reward"] == before["reward"] and now["text"] == ""
        # every reward is the verifier's score of the file written
        sem, qual = ag.questions(rows[0])
        last = saved["rounds"][2]
        assert last["reward"] == pytest.approx(rs.score_batch(v, [Image.open(folder / last["image"])], [sem],
                                                              [qual])["rewards"][0], abs=1e-6)
    assert kept and refined
    summary = json.loads((out / "rounds_summary.json").read_text())
    assert summary["rounds"][0]["kept"] + summary["rounds"][0]["refined"] == pytest.approx(1.0)


def test_sample_test_prompts_with_the_verify_reflection(tmp_path, monkeypatch, capsys):
    instructions = []
    generate = ag.Reasoner.generate

    def recording(self, instruction, image, n):
        instructions.append((instruction, image is not None))
        return generate(self, instruction, image, n)

    monkeypatch.setattr(ag.Reasoner, "generate", recording)
    out = tmp_path / "rounds"
    ag.main(["sample", "--test-prompts", "--refine-rounds", "1", "--reflection", "verify", "--out", str(out)])
    tests = [r for r in ag.TOY_WORLD_PROMPTS if r["split"] == "test"]
    assert len(tests) == 24 and len(instructions) == 48
    reflections = [i for i, seen in instructions if seen]
    assert reflections == [ag.VERIFY_INSTRUCTION.format(prompt=r["prompt"]) for r in tests]
    rewards = []
    for i, r in enumerate(tests):
        saved = json.loads((out / f"{i:03d}" / "rounds.json").read_text())
        assert saved["prompt"] == r["prompt"] and [x["round"] for x in saved["rounds"]] == [0, 1]
        rewards.append([x["reward"] for x in saved["rounds"]])
    summary = json.loads((out / "rounds_summary.json").read_text())
    assert summary["all"]["reward"] == [pytest.approx(sum(x[k] for x in rewards) / 24, abs=1e-4) for k in (0, 1)]
    assert summary["explicit"]["prompts"] == 8 and summary["implicit"]["prompts"] == 16
    assert "| implicit (16) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a prompt or the test prompts, not both
        ag.parse_args(["sample", "--prompt", "x", "--test-prompts"])
    with pytest.raises(SystemExit):
        ag.parse_args(["--reflection", "confirm"])


# --------------------------------------------------------------------------------------------------
# Evaluation on the paper's benchmarks (`alphagrpo.py eval`): tiny files in each benchmark's own format
# --------------------------------------------------------------------------------------------------


def write_json(path, obj, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in obj) if lines else json.dumps(obj))
    return path


GENEVAL_ROWS = [  # two lines of GenEval's prompts/evaluation_metadata.jsonl
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "position", "include": [{"class": "sink", "count": 1}, {"class": "tie", "count": 1,
                                                                     "position": ["above", 0]}],
     "prompt": "a photo of a tie above a sink"}]


def bench_data(root, benchmark):
    """A few prompts in the benchmark's published format; returns the --data path."""
    if benchmark == "geneval":
        return write_json(root / "evaluation_metadata.jsonl", GENEVAL_ROWS, lines=True)
    if benchmark == "dpg":  # ELLA's dpg_bench/prompts/<item>.txt, no trailing newline
        (root / "prompts").mkdir(parents=True)
        (root / "prompts" / "0.txt").write_text("An expansive field holds eight round green cabbages.")
        (root / "prompts" / "partiprompts10.txt").write_text("A bronze pharaoh statue wearing steampunk glasses.")
        return root / "prompts"
    if benchmark == "wise":  # data_verified/: per-category lists, merge.json repeating them; a legacy *_rewrite.json
        row = lambda i, p: {"Prompt": p, "Explanation": "...", "Category": "Biology", "Subcategory": "State",
                            "prompt_id": i}
        culture = [row(1, "The pastry shared at the Mid-Autumn Festival"), row(2, "A Chuseok wrestling contest")]
        science = [row(641, "A birch tree whose chlorophyll breaks down")]
        write_json(root / "data" / "cultural_common_sense_verified.json", culture)
        write_json(root / "data" / "natural_science_verified.json", science)
        write_json(root / "data" / "merge.json", culture + science)
        write_json(root / "data" / "natural_science_rewrite.json", [row(641, "A birch tree with yellow leaves")])
        return root / "data"
    if benchmark == "tiif":  # data/test_prompts/<type>_prompts.jsonl
        rel = lambda s: {"type": "2d_spatial_relation", "short_description": s, "long_description": s + " In detail."}
        write_json(root / "test_prompts" / "2d_spatial_relation_prompts.jsonl",
                   [rel("A cat is beneath a microwave."), rel("A cup is left of a pig.")], lines=True)
        write_json(root / "test_prompts" / "color+2d_prompts.jsonl", [{
            "type": "color+2d", "short_description": "A red cup on a blue table.",
            "long_description": "A red cup stands on a blue table."}], lines=True)
        return root / "test_prompts"
    # gedit: the documented export of the Hub dataset, sources of other sizes and formats
    (root / "gedit" / "images").mkdir(parents=True)
    Image.new("RGB", (40, 24), (200, 30, 30)).save(root / "gedit" / "images" / "en_0001.png")
    Image.new("RGB", (24, 40), (30, 30, 200)).save(root / "gedit" / "images" / "cn_0001.jpg")
    rows = [{"key": "0001", "task_type": "color_alter", "instruction": "Make the wall green.",
             "instruction_language": "en", "input_image": "images/en_0001.png"},
            {"key": "0001", "task_type": "color_alter", "instruction": "把墙变成绿色。", "instruction_language": "cn",
             "input_image": "images/cn_0001.jpg"}]
    write_json(root / "gedit" / "metadata.jsonl", rows, lines=True)
    return root / "gedit"


# every file of one round's tree, with its image size (None: not an image) at --resolution 32
EXPECTED_TREE = {
    "geneval": {**{f"0000{i}/samples/0000{j}.png": (32, 32) for i in range(2) for j in range(2)},  # K = 2
                "00000/metadata.jsonl": None, "00001/metadata.jsonl": None},
    "dpg": {"0.png": (64, 64), "partiprompts10.png": (64, 64)},  # 4 samples in a 2x2 grid
    "wise": {"1.png": (32, 32), "2.png": (32, 32), "641.png": (32, 32)},
    "tiif": {**{f"2d_spatial_relation/alphagrpo/{d}_description/{i}.png": (32, 32) for d in ("short", "long")
                for i in range(2)},
             **{f"color+2d/alphagrpo/{d}_description/0.png": (32, 32) for d in ("short", "long")}},
    # an edit at its source's aspect ratio (about 32^2 pixels in multiples of 16): the scorer resizes it to the source
    "gedit": {"alphagrpo/fullset/color_alter/en/0001.png": (48, 32),
              "alphagrpo/fullset/color_alter/en/0001_SRCIMG.png": (40, 24),
              "alphagrpo/fullset/color_alter/cn/0001.png": (32, 48),
              "alphagrpo/fullset/color_alter/cn/0001_SRCIMG.png": (24, 40)},
}


def run_eval(toy_dirs, benchmark, data, out, *flags):
    ag.main(["eval", "--benchmark", benchmark, "--data", str(data), "--out", str(out), "--reasoner", toy_dirs[0],
             "--renderer", toy_dirs[1], "--eval-num-steps", "2", *flags])
    return json.loads((out / "manifest.json").read_text())


def tree_files(tree):
    return {os.path.relpath(os.path.join(d, f), tree) for d, _, fs in os.walk(tree) for f in fs}


@pytest.mark.parametrize("which", ["geneval", "dpg", "wise", "tiif", "gedit"])
def test_eval_writes_the_layout_each_scorer_reads(which, toy_dirs, tmp_path):
    data, out = bench_data(tmp_path / "data", which), tmp_path / "out"
    R, K = {"dpg": 0, "tiif": 0}.get(which, 1), {"geneval": 2, "dpg": 4}.get(which, 1)  # dpg: its default, 4
    m = run_eval(toy_dirs, which, data, out, "--refine-rounds", str(R),
                 *(["--samples-per-prompt", "2"] if which == "geneval" else []))
    expected = EXPECTED_TREE[which]
    drawn = [r for r, s in expected.items() if s is not None and "SRCIMG" not in r]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "texts.jsonl"] + [f"round_{k}" for k in range(R + 1)])
    for k in range(R + 1):  # each round its own complete tree, and nothing else in it (DPG's scorer lists the folder)
        tree = out / f"round_{k}"
        assert tree_files(tree) == set(expected)
        for rel, size in expected.items():
            if size is not None:
                assert Image.open(tree / rel).size == size, rel
    n_prompts = {"geneval": 2, "dpg": 2, "wise": 3, "tiif": 6, "gedit": 2}[which]
    assert m["benchmark"] == which and m["checkpoint"] is None and m["trees"] == [f"round_{k}" for k in range(R + 1)]
    assert m["counts"] == {"prompts": n_prompts, "samples_per_prompt": K, "rounds": R + 1, "drawn": n_prompts,
                           "already_done": 0, "images_per_round": len(drawn)}
    assert len(m["seeds"]["items"]) == n_prompts and m["arguments"]["reasoning"] is True
    assert m["arguments"]["eval_num_steps"] == 2 and m["arguments"]["data"] == str(data)
    assert m["commit"] is None or len(m["commit"]) == 40
    for k in range(R + 1):  # the scorer's commands, pointed at that round's tree
        cmds = m["scorer"]["commands"][f"round_{k}"]
        assert cmds and all(str(out / f"round_{k}") in c for c in cmds)
    assert m["scorer"]["repository"] and m["scorer"]["needs"]
    texts = [json.loads(x) for x in (out / "texts.jsonl").read_text().splitlines()]
    assert len(texts) == n_prompts * K * (R + 1) and any(t["text"] for t in texts)  # reasoning is on by default
    if which == "geneval":  # metadata.jsonl holds the prompt's own line: the scorer json.load()s it
        rows = [json.loads((out / "round_1" / f"0000{i}" / "metadata.jsonl").read_text()) for i in (0, 1)]
        assert rows == GENEVAL_ROWS
    if which == "dpg":  # the grid's tiles are the 4 samples, not one image repeated
        grid = Image.open(out / "round_0" / "0.png")
        tiles = [grid.crop((x, y, x + 32, y + 32)).tobytes() for y in (0, 32) for x in (0, 32)]
        assert len(set(tiles)) == 4
        assert m["scorer"]["commands"]["round_0"][0].startswith("PROCESSES=$(nvidia-smi -L | wc -l) PIC_NUM=4 bash ")
        assert m["scorer"]["commands"]["round_0"][0].endswith(" 32")  # --resolution of one tile
    if which == "gedit":  # the scorer compares the edit with the source written beside it
        src = out / "round_0" / "alphagrpo/fullset/color_alter/cn/0001_SRCIMG.png"
        assert Image.open(src).tobytes() == Image.open(data / "images" / "cn_0001.jpg").convert("RGB").tobytes()
    if R:  # refinement changed the images: round 1 is not a copy of round 0
        assert any(Image.open(out / "round_0" / r).tobytes() != Image.open(out / "round_1" / r).tobytes()
                   for r in drawn)


def test_eval_resumes_and_seeds_by_prompt_id(toy_dirs, tmp_path):
    data, out = bench_data(tmp_path / "data", "wise"), tmp_path / "out"
    run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "0", "--no-reasoning")
    first = (out / "round_0" / "2.png").read_bytes()
    # one more round: round 0 is redrawn identically (each sample's seed comes from its id), round 1 is added
    m = run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "1", "--no-reasoning")
    assert m["counts"]["drawn"] == 3 and (out / "round_0" / "2.png").read_bytes() == first
    assert tree_files(out / "round_1") == {"1.png", "2.png", "641.png"}
    # a killed run: one image missing; the rerun draws only that prompt, identically, and leaves the rest alone
    lost = (out / "round_1" / "641.png").read_bytes()
    (out / "round_1" / "641.png").unlink()
    stamps = {p: os.stat(out / p).st_mtime_ns for p in ("round_0/1.png", "round_1/1.png", "round_1/2.png")}
    m = run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "1", "--no-reasoning")
    assert m["counts"]["drawn"] == 1 and m["counts"]["already_done"] == 2
    assert (out / "round_1" / "641.png").read_bytes() == lost
    assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps
    # that prompt alone in another file, so at another position: the same image for the same prompt_id
    rows = json.loads((data / "cultural_common_sense_verified.json").read_text())
    other = write_json(tmp_path / "alone.json", [r for r in rows if r["prompt_id"] == 2])
    run_eval(toy_dirs, "wise", other, tmp_path / "out2", "--no-reasoning")
    assert (tmp_path / "out2" / "round_0" / "2.png").read_bytes() == first
    texts = [json.loads(x) for x in (out / "texts.jsonl").read_text().splitlines()]
    assert all((t["text"] == "") == (t["round"] == 0) for t in texts)  # no plan; a refinement always reflects
    # other settings into the same folder would mix two models' images in one tree: refused
    with pytest.raises(SystemExit, match=r"other settings \(.*reasoning=False there, True here"):
        run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "1")
    with pytest.raises(SystemExit, match="wise's scorer reads 1 to 1 images a prompt"):
        run_eval(toy_dirs, "wise", data, tmp_path / "out3", "--samples-per-prompt", "2")


def test_eval_draws_with_the_checkpoint(toy_dirs, tmp_path):
    """Before and after: --checkpoint loads the trained LoRA weights, which change the images."""
    policy, args = make_policy(toy_dirs)
    randomize_lora(policy, scale=0.5)
    ag.save_checkpoint(policy, torch.optim.AdamW(policy.renderer.lora_params), args, 3, str(tmp_path / "run"))
    data = bench_data(tmp_path / "data", "wise")
    before = run_eval(toy_dirs, "wise", data, tmp_path / "before", "--limit", "1", "--no-reasoning")
    after = run_eval(toy_dirs, "wise", data, tmp_path / "after", "--limit", "1", "--no-reasoning",
                     "--checkpoint", str(tmp_path / "run"))
    assert before["checkpoint"] is None and after["checkpoint"] == str(tmp_path / "run")
    assert after["counts"]["prompts"] == 1 and tree_files(tmp_path / "after" / "round_0") == {"1.png"}
    assert (tmp_path / "before/round_0/1.png").read_bytes() != (tmp_path / "after/round_0/1.png").read_bytes()


@pytest.mark.parametrize("which, breakage, message", [
    ("geneval", lambda d: d.write_text(d.read_text().replace('"prompt": "a photo of a tie', '"prompt": 7, "x": "')),
     r"evaluation_metadata.jsonl:2: 'prompt' is missing, empty or not a string"),
    ("geneval", lambda d: d.write_text(d.read_text() + "{not json\n"),
     r"evaluation_metadata.jsonl:3: not valid JSON"),
    ("dpg", lambda d: (d / "partiprompts10.txt").write_text("  \n"), r"partiprompts10.txt: empty prompt"),
    ("wise", lambda d: write_json(d / "natural_science_verified.json", [{"Prompt": "x", "prompt_id": "641"}]),
     r"natural_science_verified.json: item 0: 'prompt_id' must be an integer"),
    ("wise", lambda d: write_json(d / "natural_science_verified.json", [{"Prompt": "x", "prompt_id": 1}]),
     r"natural_science_verified.json: item 0: prompt_id 1 has another prompt in .*cultural_common_sense"),
    ("tiif", lambda d: (d / "color+2d_prompts.jsonl").write_text('{"type": "color+2d", "short_description": "x"}\n'),
     r"color\+2d_prompts.jsonl:1: 'long_description' is missing"),
    ("gedit", lambda d: (d / "images" / "cn_0001.jpg").unlink(),
     r"metadata.jsonl:2: source image .*cn_0001.jpg not found"),
    ("gedit", lambda d: (d / "metadata.jsonl").write_text(
        (d / "metadata.jsonl").read_text().replace('"key": "0001"', '"key": "../0001"', 1)),
     r"metadata.jsonl:1: 'key' = '../0001' cannot be a file name"),
])
def test_eval_names_the_broken_benchmark_file(which, breakage, message, tmp_path):
    data = bench_data(tmp_path / "data", which)
    breakage(data)
    with pytest.raises(SystemExit, match="^error: .*" + message):  # before loading any model (there is none)
        run_eval(("no-reasoner", "no-renderer"), which, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --refine-only-wrong: the images each fixture's scorer marks wrong, as (item id, sample)
WRONG = {"geneval": {("00000", 1), ("00001", 0)}, "dpg": {("0", 2)},
         "tiif": {("2d_spatial_relation/short_description/1", 0), ("color+2d/long_description/0", 0)}}


def scorer_results(which, root, tree, wrong, items, K):
    """Each scorer's output for round 0 (`tree`, as given on its command line), judging `wrong` wrong."""
    if which == "geneval":  # evaluation/evaluate_images.py: pandas records, '/' escaped as '\\/'
        path = root / "results.jsonl"
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        for it in items:
            meta = json.loads(it["meta"][f"{it['id']}/metadata.jsonl"])
            for j in range(K):
                ok = (it["id"], j) not in wrong
                lines.append(json.dumps({"filename": f"{tree}/{it['id']}/samples/{j:05d}.png", "tag": meta["tag"],
                                         "prompt": meta["prompt"], "correct": ok, "reason": "" if ok else
                                         "expected bench>=1, found 0", "metadata": json.dumps(meta),
                                         "details": "{}"}).replace("/", "\\/"))
        path.write_text("\n".join(lines) + "\n")
        return path
    if which == "dpg":  # compute_dpg_bench.py --pic-num 4: '<path>, s0, s1, s2, s3, mean', then the summary
        path = root / "dpg-bench_20260101-000000_results.txt"
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        for it in items:
            scores = [0.5 if (it["id"], j) in wrong else 1.0 for j in range(K)]
            lines.append(f"{tree}/{it['id']}.png, " + ", ".join(map(str, scores)) + f", {sum(scores) / K}")
        path.write_text("\n".join(lines) + "\n\nModel: \nL1 category scores:\n\tentity: 90.12\n"
                        "DPG-Bench score: 84.1234\n")
        return path
    for it in items:  # eval_with_vlm.py --output_dir: <model>/<type>/<short|long>/<i>.json
        kind, desc, i = it["id"].split("/")
        bad = (it["id"], 0) in wrong
        write_json(root / "alphagrpo" / kind / desc.split("_")[0] / f"{i}.json", {
            "attribute": kind, "desc": desc, "jsonl_file": f"{kind}_eval_prompts.jsonl", "line_idx": int(i),
            "questions": ["Is there a cat in the image?", "Is the cat beneath the microwave?"],
            "gt_answers": ["Yes", "yes"],  # the published files write some "Yes": the judge answers "yes"
            "model_pred": ["yes", "no" if bad else "yes"], "model_output": "yes\nno"})
    return root


def sample_pixels(tree, it, j, K):
    """Sample j of an item in a round's tree, as pixels (DPG-Bench: its tile of the grid)."""
    return [im.tobytes() for im in ag.read_round(str(tree), it, K)][j]


@pytest.mark.parametrize("which", ["geneval", "dpg", "tiif"])
def test_refine_only_wrong_refines_exactly_what_the_scorer_marked_wrong(which, toy_dirs, tmp_path):
    """The paper's protocol: round 0 drawn without reasoning, scored by the benchmark's scorer; round 1
    refines exactly the images it marked wrong, as an ungated round refines them, and copies the right
    ones byte for byte."""
    data = bench_data(tmp_path / "data", which)
    K = {"geneval": 2, "dpg": 4}.get(which, 1)
    flags = ["--no-reasoning"] + (["--samples-per-prompt", "2"] if which == "geneval" else [])
    out, ungated = tmp_path / "out", tmp_path / "ungated"
    run_eval(toy_dirs, which, data, out, *flags)
    items = ag.BENCHMARKS[which]["read"](str(data), K)
    results = scorer_results(which, tmp_path / "scores", out / "round_0", WRONG[which], items, K)
    round_0 = {p: (out / "round_0" / p).read_bytes() for p in tree_files(out / "round_0")}
    m = run_eval(toy_dirs, which, data, out, *flags, "--refine-rounds", "1", "--refine-only-wrong", str(results))
    assert {p: (out / "round_0" / p).read_bytes() for p in tree_files(out / "round_0")} == round_0
    assert tree_files(out / "round_1") == set(round_0)
    run_eval(toy_dirs, which, data, ungated, *flags, "--refine-rounds", "1")
    for it in items:
        for j in range(K):
            now = sample_pixels(out / "round_1", it, j, K)
            if (it["id"], j) in WRONG[which]:  # refined, as an ungated round refines it
                assert now == sample_pixels(ungated / "round_1", it, j, K) != sample_pixels(out / "round_0", it, j, K)
            else:
                assert now == sample_pixels(out / "round_0", it, j, K)
        if not any((it["id"], j) in WRONG[which] for j in range(K)):  # a file of right images: copied
            assert all((out / "round_1" / p).read_bytes() == round_0[p] for p in it["images"])
    record = m["refinement"]["round_1"]
    assert sorted(map(tuple, record["refined_images"])) == sorted(WRONG[which])
    assert record["kept"] == len(items) * K - len(WRONG[which]) and record["better"] is None
    assert m["gates"] == {"round_1": f"only_wrong={results}"}
    texts = [json.loads(x) for x in (out / "texts.jsonl").read_text().splitlines()]
    assert sorted((t["id"], t["sample"]) for t in texts if t["round"] == 1 and t["refined"]) == sorted(WRONG[which])
    # a round refined under another gate is never mixed into this one
    with pytest.raises(SystemExit, match="round_1 was refined with the gate 'only_wrong=.*', not 'all'"):
        run_eval(toy_dirs, which, data, out, *flags, "--refine-rounds", "1")


def fake_round_0(out, which, K):
    """Round 0's files, empty: enough for the checks that run before anything is drawn."""
    data = bench_data(out.parent / "data", which)
    items = ag.BENCHMARKS[which]["read"](str(data), K)
    for p in (p for it in items for p in it["images"]):
        (out / "round_0" / p).parent.mkdir(parents=True, exist_ok=True)
        (out / "round_0" / p).touch()
    return data, items


@pytest.mark.parametrize("which, breakage, message", [
    ("geneval", lambda p, r: p.write_text(p.read_text().replace("\\/00001\\/", "\\/00007\\/")),
     r"judges '00007/samples/00000.png' \(and 1 more\), which round_0 of this --out does not hold"),
    ("geneval", lambda p, r: p.write_text(p.read_text().replace("a photo of a bench", "a photo of a bus")),
     r"was judged for 'a photo of a bus' but drawn for 'a photo of a bench'"),
    ("geneval", lambda p, r: p.write_text("\n".join(p.read_text().splitlines()[:3]) + "\n"),
     r"judges 3 of the 4 images of round_0"),
    ("dpg", lambda p, r: p.write_text('{"filename": "t/0.png", "correct": true}\n'),  # GenEval's, say
     r"no '<path>, <scores>..., <mean>' lines: not the results file of DPG-Bench"),
    ("dpg", lambda p, r: p.write_text("t/0.png, 1.0, 1.0\nt/partiprompts10.png, 0.5, 0.5\n"),
     r"1 tile score\(s\) for '0', but K = 4 samples were drawn: score with PIC_NUM=4"),
    ("tiif", lambda p, r: shutil.copytree(p / "alphagrpo", p / "other-model"),
     r"two models' results\? pass the folder of one"),
    ("tiif", lambda p, r: (p / "alphagrpo" / "color+2d" / "long" / "0.json").write_text("{}"),
     r"0.json: not an eval_with_vlm.py result"),
])
def test_refine_only_wrong_refuses_other_results_before_drawing(which, breakage, message, tmp_path):
    K = {"geneval": 2, "dpg": 4}.get(which, 1)
    out = tmp_path / "out"
    data, items = fake_round_0(out, which, K)
    results = scorer_results(which, tmp_path / "scores", out / "round_0", set(), items, K)
    breakage(results, tmp_path)
    flags = ["--samples-per-prompt", "2"] if which == "geneval" else []
    with pytest.raises(SystemExit, match="^error: .*" + message):  # before any model loads (there is none)
        run_eval(("no-reasoner", "no-renderer"), which, data, out, *flags, "--refine-rounds", "1",
                 "--refine-only-wrong", str(results))
    assert not (out / "round_1").exists() and not (out / "manifest.json").exists()


def test_refine_only_wrong_needs_the_scored_round_0_and_a_scorer_it_reads(tmp_path, capsys):
    data = bench_data(tmp_path / "data", "geneval")
    results = tmp_path / "results.jsonl"
    results.write_text("")
    with pytest.raises(SystemExit, match=r"round_0 misses 8 image\(s\).*draw and score it first"):
        run_eval(("r", "r"), "geneval", data, tmp_path / "out", "--refine-rounds", "1", "--refine-only-wrong",
                 str(results))
    wise = bench_data(tmp_path / "wise", "wise")
    with pytest.raises(SystemExit, match="GenEval's, DPG-Bench's and TIIF-Bench's scorers .* not wise's"):
        run_eval(("r", "r"), "wise", wise, tmp_path / "out", "--refine-rounds", "1", "--refine-only-wrong",
                 str(results))
    with pytest.raises(SystemExit):
        run_eval(("r", "r"), "wise", wise, tmp_path / "out", "--refine-rounds", "1", "--refine-only-wrong", "nothing")
    assert "--refine-only-wrong nothing: no such file" in capsys.readouterr().err


def test_eval_with_the_verifier_gate(toy_dirs, tmp_path):
    """`eval --refine-below`: each image scored with its prompt's questions (from --prompts); a round refines
    those below TAU, copies the others byte for byte, and the manifest counts them."""
    data = bench_data(tmp_path / "data", "wise")
    prompts = [r["Prompt"] for r in json.loads((data / "merge.json").read_text())]
    question = {"question": "Is the bottom half of the image green?", "tag": "Spatial"}
    rows = write_json(tmp_path / "questions.jsonl", [{"prompt": p, "semantic_questions": [question]}
                                                     for p in prompts[:2]], lines=True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"1 of the 3 prompts are not in the prompt set .*birch"):
        run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "1", "--refine-below", "0.3", "--prompts", str(rows))
    write_json(rows, [{"prompt": p, "semantic_questions": [question]} for p in prompts], lines=True)
    run_eval(toy_dirs, "wise", data, out, "--refine-below", "0.3", "--prompts", str(rows))  # round 0, scored
    first = {t["id"]: t["reward"] for t in map(json.loads, (out / "texts.jsonl").read_text().splitlines())}
    assert len(set(first.values())) == 3  # three different rewards: a TAU between them splits the images
    tau = sorted(first.values())[1]
    m = run_eval(toy_dirs, "wise", data, out, "--refine-rounds", "2", "--refine-below", str(tau), "--prompts", str(rows))
    texts = {(t["id"], t["round"]): t for t in map(json.loads, (out / "texts.jsonl").read_text().splitlines())}
    assert {i: texts[(i, 0)]["reward"] for i in first} == first  # round 0 drawn again, identically
    assert [texts[(i, 1)]["refined"] for i in sorted(first, key=first.get)] == [True, False, False]
    for item in first:
        for k in (1, 2):
            before, now = texts[(item, k - 1)], texts[(item, k)]
            assert now["refined"] == (before["reward"] < tau)
            files = [(out / f"round_{r}" / f"{item}.png").read_bytes() for r in (k - 1, k)]
            assert (files[0] == files[1]) == (not now["refined"])
    for k in (1, 2):
        record = m["refinement"][f"round_{k}"]
        assert record["refined"] == sum(texts[(i, k)]["refined"] for i in first)
        assert record["refined"] + record["kept"] == 3 and record["better"] is not None


# --------------------------------------------------------------------------------------------------
# Checkpoints, resume, export
# --------------------------------------------------------------------------------------------------


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_resume_is_exact(toy_dirs, tmp_path):
    common = dict(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=4, groups_per_step=2, save_every=2,
                  sample_every=0, eval_every=2)
    ag.train(ag.Args(steps=4, out=str(tmp_path / "straight"), **common))
    ag.train(ag.Args(steps=2, out=str(tmp_path / "split"), **common))
    # a killed run may have written a row after its last checkpoint: resume must drop it
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "reward_mean": -1}) + "\n")
    ag.train(ag.Args(steps=4, out=str(tmp_path / "split"), resume=str(tmp_path / "split"), **common))
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    straight, split = read(tmp_path / "straight"), read(tmp_path / "split")
    # the 2-step run's final evaluation (its row at step 2) made way for the resumed step 2, which evaluates first
    assert [r["step"] for r in split] == [0, 1, 2, 3, 4]
    assert [r["eval_reward"] is not None for r in split] == [True, False, True, False, True]
    assert strip_times(straight) == strip_times(split)


def test_checkpoints_are_refused_when_corrupt_partial_or_foreign(toy_dirs, tmp_path):
    import shutil

    common = dict(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=4, groups_per_step=2, sample_every=0,
                  eval_every=0, save_every=1)
    ag.train(ag.Args(steps=1, out=str(tmp_path / "run"), **common))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    policy, args = make_policy(toy_dirs, group_size=4, groups_per_step=2)
    optimizer = torch.optim.AdamW(policy.reasoner.lora_params + policy.renderer.lora_params)
    with pytest.raises(ValueError, match="lr=1e-05 there, 0.5 here"):
        ag.load_checkpoint(str(ckpt), policy, optimizer, ag.Args(**{**common, "lr": 0.5}))
    # inference (no optimizer) needs only the model's arguments to match
    assert ag.load_checkpoint(str(tmp_path / "run"), policy, None, ag.Args(**{**common, "lr": 0.5})) == 1
    with pytest.raises(ValueError, match="lora_rank=8 there, 4 here"):
        ag.load_checkpoint(str(ckpt), policy, None, ag.Args(**{**common, "lora_rank": 4}))
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = bytearray((bad / "lora.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "lora.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="lora.safetensors is missing or corrupt"):
        ag.load_checkpoint(str(bad), policy, None, ag.Args(**common))
    (bad / "state.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ag.load_checkpoint(str(bad), policy, None, ag.Args(**common))


def merge_exported_lora(sd: dict, modules: dict, rank: int):
    """Every exported key names an nn.Linear of the base model with the right shapes; add B A to its weight
    (alpha / r is already folded into B)."""
    for k, w in sd.items():
        name, kind = k[len("transformer."):].rsplit(".lora_", 1)
        lin = modules[name]
        assert isinstance(lin, torch.nn.Linear)
        assert w.shape == ((rank, lin.in_features) if kind == "A.weight" else (lin.out_features, rank))
    with torch.no_grad():
        for k in sd:
            if k.endswith("lora_A.weight"):
                name = k[len("transformer."):-len(".lora_A.weight")]
                modules[name].weight += sd[f"transformer.{name}.lora_B.weight"] @ sd[k]


def test_renderer_lora_export_loads_in_diffusers_and_merges(toy_dirs, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    policy, args = make_policy(toy_dirs, lora_rank=4, lora_alpha=12.0)  # scale 3: the folding matters
    randomize_lora(policy, scale=0.2)
    ag.export_lora(policy, args, str(tmp_path))
    sd = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "renderer"))
    base = SD3Transformer2DModel.from_pretrained(toy_dirs[1], subfolder="transformer")
    modules = dict(base.named_modules())
    assert sd and all(k.startswith("transformer.") for k in sd)
    merge_exported_lora(sd, modules, rank=4)  # W + B A by hand; compared with our LoRA-wrapped model
    torch.manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 4, 4), torch.randn(2, 7, 32), torch.randn(2, 32)
    t = torch.tensor([500.0, 500.0])
    ours = policy.renderer.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                                       return_dict=False)[0]
    merged = base(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]
    assert torch.allclose(ours, merged, atol=1e-5)
    with ag.lora_disabled(policy.renderer.transformer):
        assert not torch.allclose(policy.renderer.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                  pooled_projections=pooled, return_dict=False)[0], merged, atol=1e-3)


def test_reasoner_lora_export_is_a_peft_adapter(toy_dirs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    policy, args = make_policy(toy_dirs)
    randomize_lora(policy)
    ag.export_lora(policy, args, str(tmp_path))
    config = json.loads((tmp_path / "reasoner" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == args.lora_rank and config["lora_alpha"] == args.lora_alpha
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    sd = load_file(str(tmp_path / "reasoner" / "adapter_model.safetensors"))
    base = dict(AutoModelForImageTextToText.from_pretrained(toy_dirs[0]).named_modules())
    assert sd
    for k, w in sd.items():  # PEFT's layout: base_model.model.<module>.lora_A.weight
        assert k.startswith("base_model.model.") and ".visual." not in k
        name, kind = k[len("base_model.model."):].rsplit(".lora_", 1)
        lin = base[name]
        assert w.shape == ((args.lora_rank, lin.in_features) if kind == "A.weight" else (lin.out_features, args.lora_rank))
    ours = {n: p for n, p in policy.reasoner.model.named_parameters() if ".lora_" in n}
    assert all(torch.equal(sd["base_model.model." + n], p) for n, p in ours.items())  # alpha stays in the config


# --------------------------------------------------------------------------------------------------
# Multi-GPU: torchrun with torch.distributed (gloo on the CPU)
# --------------------------------------------------------------------------------------------------


def _dist_worker(rank, world, port, toy, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    import random as _random

    from transformers.utils import logging as tl

    tl.disable_progress_bar()
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    policy, args = make_policy(toy, group_size=4, groups_per_step=4, updates_per_rollout=1)
    randomize_lora(policy)
    # the same fixed rollout data everywhere (seeded per group), each rank training on its share
    groups = [rollout(policy, args, seed=k) for k in range(4)]
    mine = groups[rank::world]
    opt = torch.optim.SGD(policy.reasoner.lora_params + policy.renderer.lora_params, lr=0.1)
    grads = {}
    orig_step = opt.step

    def step_and_record(*a, **kw):
        for i, p in enumerate(policy.reasoner.lora_params + policy.renderer.lora_params):
            grads[i] = p.grad.detach().clone()
        return orig_step(*a, **kw)

    opt.step = step_and_record
    ag.update(policy, opt, mine, args, _random.Random(0), world)
    torch.save({"grads": grads, "params": [p.detach() for p in policy.reasoner.lora_params + policy.renderer.lora_params]},
               os.path.join(out, f"w{world}_r{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_processes_match_one(toy_dirs, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _dist_worker(0, 1, port, toy_dirs, str(tmp_path))
    mp.spawn(_dist_worker, args=(2, port, toy_dirs, str(tmp_path)), nprocs=2, join=True)
    one = torch.load(tmp_path / "w1_r0.pt")
    r0, r1 = torch.load(tmp_path / "w2_r0.pt"), torch.load(tmp_path / "w2_r1.pt")
    for i in one["grads"]:
        assert torch.allclose(r0["grads"][i], one["grads"][i], atol=1e-6, rtol=1e-4), i
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # identical weights on both ranks
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r0["params"], one["params"]))


# --------------------------------------------------------------------------------------------------
# The real preset (sd35): its shapes, and its code path at toy sizes
# --------------------------------------------------------------------------------------------------


def test_sd35_dry_run_has_the_published_parameter_counts(capsys):
    """--dry-run builds Qwen3-VL-4B-Instruct and SD3.5-medium on the meta device from the embedded configs;
    their sizes must be the published ones (model cards and safetensors sizes), LoRA excluded."""
    _, args, _ = ag.parse_args(["--preset", "sd35", "--dry-run", "--device", "cpu"])
    rows = {name: n for name, n, _ in ag.dry_run(args)}
    assert rows["reasoner"] == 4_437_815_808
    assert rows["renderer.transformer"] == 2_243_171_520 + 226_492_416  # + the saved pos-embed buffer
    for name, published in [("renderer.text_encoder (CLIP-L)", 123.65e6), ("renderer.text_encoder_2 (CLIP-G)", 694.66e6),
                            ("renderer.text_encoder_3 (T5)", 4.762e9), ("renderer.vae", 83.8e6)]:
        assert rows[name] == pytest.approx(published, rel=2e-3), name
    assert "total (estimate)" in capsys.readouterr().out


def test_toy_dry_run_runs_one_step(tmp_path):
    _, args, _ = ag.parse_args(["--dry-run", "--out", str(tmp_path / "dry"), "--groups-per-step", "2",
                                "--group-size", "4"])
    ag.dry_run(args)
    row = json.loads((tmp_path / "dry" / "metrics.jsonl").read_text())
    assert row["step"] == 0 and math.isfinite(row["text_loss"]) and math.isfinite(row["image_loss"])


def test_real_preset_code_path_at_toy_sizes(toy_dirs, tmp_path):
    """The sd35 preset's path (prompts.jsonl with its tags, a transformers verifier over HTTP, gradient
    checkpointing, evaluation on the test split) with the toy models in place of the real ones."""
    rows = [json.loads(x) for x in open(os.path.join(HERE, "prompts.jsonl"))]
    subset = [r for r in rows if r["split"] == "train"][:2] + [r for r in rows if r["split"] == "test"][:2]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in subset))
    server, url = serve(rs.TransformersVerifier(toy_dirs[0], device="cpu", dtype="float32"))
    try:
        _, args, _ = ag.parse_args([
            "--preset", "sd35", "--reasoner", toy_dirs[0], "--renderer", toy_dirs[1], "--prompts", str(tmp_path / "p.jsonl"),
            "--reward-url", url, "--out", str(tmp_path / "run"), "--dtype", "float32", "--device", "cpu",
            "--resolution", "32", "--num-steps", "4", "--eval-num-steps", "4", "--sde-window", "2",
            "--sde-window-start-max", "0", "--group-size", "2", "--groups-per-step", "2", "--max-new-tokens", "6",
            "--max-text-tokens", "64", "--steps", "2", "--eval-every", "1", "--save-every", "0", "--sample-every", "1"])
        assert args.gradient_checkpointing and args.image_clip == 1e-4 and args.lora_rank == 32
        ag.train(args)
    finally:
        server.shutdown()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_reward"] is not None for m in metrics] == [True, True, True]  # steps 0, 1 and the end
    tags = {q["tag"] for r in subset[:2] for k in ("semantic_questions", "quality_questions") for q in r[k]}
    assert all(metrics[0][f"score_{t}"] is not None for t in tags)
    assert (tmp_path / "run" / "eval" / "step_000001.png").exists()



def test_ode_sampler_equals_the_diffusers_pipeline(toy_dirs):
    """Our sampler with the SDE window off is the stock StableDiffusion3Pipeline (Euler on the shifted sigmas,
    CFG): same x_T, embeddings, steps and guidance give the same latents."""
    policy, args = make_policy(toy_dirs, num_steps=6, guidance_scale=3.0)
    renderer, G = policy.renderer, 3
    randomize_lora(policy)
    cond = renderer.encode(["a green meadow at the bottom"] * G)
    x_T = renderer.noise(G, torch.Generator().manual_seed(0))
    ours, _, _ = ag.render(renderer, cond, x_T, renderer.sigmas(args.num_steps), range(0), 0.0)
    theirs = renderer.pipe(latents=x_T, prompt_embeds=cond[0][G:], negative_prompt_embeds=cond[0][:G],
                           pooled_prompt_embeds=cond[1][G:], negative_pooled_prompt_embeds=cond[1][:G],
                           num_inference_steps=6, guidance_scale=3.0, height=32, width=32, output_type="latent").images
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bench_runs_on_the_unified_toy(capsys):
    """`bench --policy unified` end to end on the toy Cosmos3 (random weights at the toy's unified shapes): exact
    on-policy ratios, our cached, batched sampler equal to Cosmos3OmniPipeline with CFG, a training step."""
    command, args, extra = ag.parse_args(["bench", "--policy", "unified", "--group-size", "2", "--groups-per-step",
                                          "2", "--repeats", "1", "--guidance-scale", "2", "--max-new-tokens", "8"])
    fig = ag.bench(args, **extra)
    assert fig["text_ratio_dev"] < 1e-6 and fig["image_ratio_dev"] < 1e-6 and fig["image_clipfrac"] == 0
    assert fig["ode_max_diff"] < 1e-5 and fig["sampler_s"] > 0 and fig["pipeline_s"] > 0
    assert "Cosmos3OmniPipeline" in capsys.readouterr().out and fig["time_step"] > 0


def test_bench_runs_on_the_toy(capsys):
    """`bench` (the GPU figures of issue 9) on the toy: exact on-policy ratios in fp32, our sampler equal to the
    pipeline, and a training step through a random verifier served on the same device, its time split whole."""
    command, args, extra = ag.parse_args(["bench", "--group-size", "4", "--groups-per-step", "2", "--repeats", "1"])
    assert command == "bench" and extra == {"verifier": "", "repeats": 1, "layers": 0, "train_step": True}
    fig = ag.bench(args, **extra)
    assert fig["text_ratio_dev"] < 1e-6 and fig["image_ratio_dev"] < 1e-6 and fig["image_clipfrac"] == 0
    assert fig["ode_max_diff"] < 1e-5 and fig["sampler_s"] > 0 and fig["pipeline_s"] > 0
    parts = sum(fig[f"time_{k}"] for k in ("reason", "render", "reward_wait", "train"))
    assert 0.5 * fig["time_step"] < parts <= fig["time_step"] and 0 <= fig["reward_wait_share"] < 1
    out = capsys.readouterr().out
    assert "1. on-policy" in out and "2. rollout sampler" in out and "3. one training step" in out

# --------------------------------------------------------------------------------------------------
# The shipped prompt set (prompts.jsonl, Sec. 4.3)
# --------------------------------------------------------------------------------------------------

REASONING_TASKS = {"world_knowledge", "cultural_knowledge", "scientific_reasoning", "temporal_reasoning"}


def check_prompt_set(rows):
    """Raise AssertionError if rows (parsed prompts.jsonl) break the prompt-set contract."""
    import re
    from collections import Counter

    keys = {"prompt", "split", "task", "difficulty", "semantic_questions", "quality_questions"}
    prompts = Counter()
    for i, row in enumerate(rows):
        assert isinstance(row, dict) and set(row) == keys, f"row {i}: keys {sorted(row)}"
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), f"row {i}: empty prompt"
        assert row["split"] in ("train", "test") and row["difficulty"] in ("easy", "medium", "hard"), f"row {i}"
        assert isinstance(row["task"], str) and re.fullmatch(r"[a-z][a-z0-9_]*", row["task"]), f"row {i}: task"
        seen = set()
        for field, tags, lo, hi in (("semantic_questions", ag.SEMANTIC_TAGS, 2, 14),
                                    ("quality_questions", ag.QUALITY_TAGS, 2, 8)):
            qs = row[field]
            assert isinstance(qs, list) and lo <= len(qs) <= hi, f"row {i}: {len(qs)} {field}"
            for q in qs:
                assert isinstance(q, dict) and set(q) == {"question", "tag"}, f"row {i}: {q!r}"
                assert isinstance(q["question"], str) and q["question"].strip().endswith("?"), f"row {i}: {q!r}"
                assert q["tag"] in tags, f"row {i}: tag {q['tag']!r} not allowed in {field}"
                assert q["question"].strip().lower() not in seen, f"row {i}: duplicate question {q['question']!r}"
                seen.add(q["question"].strip().lower())
        prompts[" ".join(row["prompt"].lower().split())] += 1
    assert not [p for p, n in prompts.items() if n > 1], "duplicate prompts"
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert not train & test and len(train) >= 400 and len(test) >= 64, (len(train), len(test))
    tasks = {s: {r["task"] for r in rows if r["split"] == s} for s in ("train", "test")}
    assert len(tasks["train"] | tasks["test"]) >= 20 and tasks["train"] == tasks["test"], "task types per split"
    tiers = Counter(r["difficulty"] for r in rows)
    for tier, target in (("easy", 0.3), ("medium", 0.5), ("hard", 0.2)):
        assert abs(tiers[tier] / len(rows) - target) <= 0.05, f"{tier}: {tiers[tier] / len(rows):.3f}"
    assert sum(r["task"] in REASONING_TASKS for r in rows) >= 60, "reasoning prompts"
    counts = Counter(q for r in rows for q in {x["question"].strip().lower() for x in r["quality_questions"]})
    assert not [q for q, n in counts.items() if n > 0.05 * len(rows)], "boilerplate quality questions"


def shipped_rows():
    return [json.loads(line) for line in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8")]


def test_shipped_prompt_set():
    check_prompt_set(shipped_rows())
    assert len(ag.load_prompts(os.path.join(HERE, "prompts.jsonl"), "train")) >= 400  # the loader accepts it
    assert len(ag.load_prompts(os.path.join(HERE, "prompts.jsonl"), "test")) >= 64


@pytest.mark.parametrize("mutate", [
    lambda rows: rows.append(dict(rows[0])),  # a duplicate prompt
    lambda rows: rows[0]["semantic_questions"][0].update(tag="Mood"),  # an unknown tag
    lambda rows: rows[-1].pop("difficulty"),  # a missing field
    lambda rows: rows[3]["quality_questions"].append(dict(rows[3]["quality_questions"][0])),  # a repeated question
    lambda rows: [r.update(split="train") for r in rows if r["task"] == "counting"],  # a task missing from test
])
def test_prompt_set_check_catches_broken_sets(mutate):
    rows = shipped_rows()
    mutate(rows)
    with pytest.raises(AssertionError):
        check_prompt_set(rows)


# --------------------------------------------------------------------------------------------------
# The trainer's side of a reward server that is down or restarts
# --------------------------------------------------------------------------------------------------


def test_training_stops_clearly_when_the_verifier_is_down(toy_dirs, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=2, groups_per_step=2, steps=2,
                   reward_url=f"http://127.0.0.1:{port}", reward_patience=2.0, out=str(tmp_path / "run"),
                   sample_every=0, eval_every=0, save_every=0)
    with pytest.raises(ag.RewardError, match=r"cannot connect.*gave up.*The run stopped at step 0.*--resume"):
        ag.train(args)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was written with made-up rewards


def test_training_survives_a_verifier_restart(toy_dirs, tmp_path):
    state = {"calls": 0}

    class Restarting(rs.ToyVerifier):
        def score(self, image, questions):
            state["calls"] += 1
            if state["calls"] == 1:  # after the first answer: down for 2 s, then back on the same port
                threading.Thread(target=restart, daemon=True).start()
            return super().score(image, questions)

    def restart():
        time.sleep(0.2)
        server.shutdown()
        server.server_close()
        for c in connections:  # a real restart also ends the connections the trainer keeps alive
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        time.sleep(2.0)
        state["server"] = ThreadingHTTPServer(("127.0.0.1", port), rs.make_handler(rs.ToyVerifier()))
        threading.Thread(target=state["server"].serve_forever, daemon=True).start()

    server, url = serve(Restarting())
    port = server.server_address[1]
    connections = []
    handler = server.RequestHandlerClass
    server.RequestHandlerClass = lambda request, *rest: (connections.append(request), handler(request, *rest))
    args = ag.Args(reasoner=toy_dirs[0], renderer=toy_dirs[1], group_size=2, groups_per_step=2, steps=3,
                   reward_url=url, reward_patience=30.0, out=str(tmp_path / "run"), sample_every=0, eval_every=0,
                   save_every=0)
    try:
        ag.train(args)
    finally:
        state.get("server", server).shutdown()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "server" in state


# --------------------------------------------------------------------------------------------------
# reward_server.py: limits, batching under load, shared prefix, OpenAI backend, decomposition (Sec. 4.2)
# --------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes that declare a width x height RGB image (the IDAT holds only a few rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def start_server(*flags, **popen):
    """`reward_server.py FLAGS --port 0` in its own process, as the trainer starts it -> (process, url)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "reward_server.py"), *flags, "--port", "0"],
                            stdout=subprocess.PIPE, text=True, **popen)
    line = proc.stdout.readline()
    assert line.startswith("reward server listening on http://127.0.0.1:"), line
    return proc, line.split("listening on", 1)[1].strip()


@contextlib.contextmanager
def serving(handler_or_verifier, token="", **kw):
    handler = handler_or_verifier if isinstance(handler_or_verifier, type) else rs.make_handler(
        handler_or_verifier, token, **kw)
    server = rs.Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def raw_post(url, header_lines: list, body: bytes = b""):
    """A request with exactly these headers (requests would add Content-Length itself)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(("POST /score HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in header_lines) + "\r\n").encode()
                  + body)
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return ag.build_toy_vlm(str(tmp_path_factory.mktemp("vlm") / "tiny"))


@pytest.fixture(scope="module")
def vlm64(tmp_path_factory):
    return ag.build_toy_vlm(str(tmp_path_factory.mktemp("vlm") / "h64"), seed=1, hidden=64, image_px=128)


# --------------------------------------------------------------------------------------------------
# Hardened: auth, limits and every kind of malformed request
# --------------------------------------------------------------------------------------------------


def test_malformed_requests_get_the_right_4xx_and_a_good_one_is_still_answered():
    token, q = "s3cret", "Is the image mostly green?"
    limits = rs.Limits(max_images=4, max_side=64, max_request_pixels=64 * 64 * 2 + 10, max_questions=3,
                       max_question_chars=60)
    green = png_b64(solid((0, 255, 0)))
    good = {"images": [green, green], "semantic_questions": [[q], [q]], "quality_questions": [[], [q]]}
    auth = {"Authorization": f"Bearer {token}"}
    jpeg = io.BytesIO()
    solid((0, 255, 0)).save(jpeg, format="JPEG")
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    with serving(rs.ToyVerifier(), token, max_body=200_000, limits=limits) as (url, _):
        post = lambda body, headers=auth, path="/score": requests.post(url + path, json=body, headers=headers)  # noqa: E731
        data = lambda raw, ctype="application/json": requests.post(  # noqa: E731
            url + "/score", data=raw, headers={**auth, "Content-Type": ctype})
        cases = [
            ("no token", post(good, headers={}), 401, "bearer token"),
            ("wrong token", post(good, headers={"Authorization": "Bearer nope"}), 401, "bearer token"),
            ("unknown path without token", requests.get(url + "/nope"), 401, "bearer token"),
            ("GET /score", requests.get(url + "/score", headers=auth), 405, "use POST /score"),
            ("unknown path", post(good, path="/nope"), 404, "no such path"),
            ("not JSON content type", data(json.dumps(good), "text/plain"), 415, "Content-Type"),
            ("invalid JSON", data(b"{oops"), 400, "not valid JSON"),
            ("invalid UTF-8", data(b'{"images": "\xff\xfe"}'), 400, "not valid JSON"),
            ("nested too deep", data(b"[" * 100_000), 400, "not valid JSON"),
            ("not an object", post([1, 2]), 400, "JSON object"),
            ("unknown key", post({**good, "quality_question": []}), 400, "unknown key(s) 'quality_question'"),
            ("missing key", post({"images": [green]}), 400, "'semantic_questions' is missing"),
            ("key not a list", post({**good, "images": green}), 400, "'images' is missing or not a list"),
            ("too many images", post({k: v * 5 for k, v in good.items()}), 413, "limit is 4 per request"),
            ("one list per image", post({**good, "semantic_questions": [[q]]}), 400, "1 lists for 2 images"),
            ("question list not a list", post({**good, "semantic_questions": [q, q]}), 400, "non-empty strings"),
            ("question not a string", post({**good, "semantic_questions": [[q], [3]]}), 400, "non-empty strings"),
            ("empty question", post({**good, "quality_questions": [["  "], []]}), 400, "non-empty strings"),
            ("question too long", post({**good, "quality_questions": [["x" * 61], []]}), 413, "61 characters"),
            ("too many questions", post({**good, "quality_questions": [[q] * 3, []]}), 413, "4 questions"),
            ("image not a string", post({**good, "images": [green, 7]}), 400, "images[1] must be a base64 string"),
            ("invalid base64", post({**good, "images": ["not base64!", green]}), 400, "not valid base64"),
            ("a JPEG", post({**good, "images": [b64(jpeg.getvalue()), green]}), 400, "not a PNG"),
            ("a GIF", post({**good, "images": [b64(b"GIF89a..."), green]}), 400, "not a PNG"),
            ("PNG without IHDR", post({**good, "images": [b64(b"\x89PNG\r\n\x1a\nbroken"), green]}), 400,
             "broken PNG"),
            ("corrupt PNG data", post({**good, "images": [b64(rs.png_bytes(solid((0, 0, 0)))[:60]), green]}), 400,
             "broken PNG"),
            ("image side too large", post({**good, "images": [png_b64(solid((0, 0, 0), size=65)), green]}), 413,
             "each side must be 1 to 64"),
            ("decompression bomb", post({**good, "images": [b64(bomb_png(100_000, 100_000)), green]}), 413,
             "100000x100000"),
            ("too many pixels", post({"images": [png_b64(solid((0, 0, 0), size=64))] * 3,
                                      "semantic_questions": [[q]] * 3, "quality_questions": [[]] * 3}), 413,
             "12288 pixels; the limit is 8202"),
            ("question the verifier cannot answer", post({**good, "semantic_questions": [["Is the cat green?"], [q]]}),
             400, "cannot answer"),
        ]
        cases += [("no Content-Length", *raw_post(url, [f"Authorization: Bearer {token}",
                                                       "Content-Type: application/json"]), 411, "Content-Length"),
                  ("Content-Length not a number", *raw_post(url, [f"Authorization: Bearer {token}",
                                                                 "Content-Type: application/json",
                                                                 "Content-Length: ten"]), 400, "not a number"),
                  ("body too large", *raw_post(url, [f"Authorization: Bearer {token}", "Content-Type: application/json",
                                                     "Content-Length: 1000000000"]), 413, "exceeds the limit")]
        assert len(cases) >= 30
        for name, *got, code, msg in cases:
            status, error = (got[0].status_code, got[0].json().get("error", "")) if len(got) == 1 else \
                (got[0], got[1].get("error", ""))
            assert status == code and msg in error, (name, status, error)
        assert requests.get(url + "/health").json()["status"] == "ok"  # open without the token
        r = post(good)
        assert r.status_code == 200, r.text
        s = rs.ToyVerifier().score(solid((0, 255, 0)), [q])[0]
        assert r.json() == {"rewards": [pytest.approx(math.sqrt(s)), pytest.approx(s)],
                            "semantic_scores": [[pytest.approx(s)], [pytest.approx(s)]],
                            "quality_scores": [[], [pytest.approx(s)]]}


def test_png_size_is_checked_before_decoding():
    body = {"images": [base64.b64encode(bomb_png(60_000, 60_000)).decode()], "semantic_questions": [[]],
            "quality_questions": [[]]}
    t = time.perf_counter()
    with pytest.raises(rs.BadRequest, match="each side must be 1 to 4096") as e:
        rs.parse_score_request(body)  # default limits: 4096 px a side
    assert e.value.status == 413 and time.perf_counter() - t < 0.5  # 10 GB never decoded
    assert rs.png_size(bomb_png(123, 45), "x") == (123, 45)


# --------------------------------------------------------------------------------------------------
# Speed: the shared image prefix equals the naive path; batching under load loses nothing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_vlm", "vlm64"])
def test_shared_prefix_equals_naive(which, request):
    v = rs.TransformersVerifier(request.getfixturevalue(which), device="cpu", dtype="float32", prefill_batch=2)
    assert v.shared_prefix  # the default
    qs = ["Is the image mostly green ?", "Is the top half of the image red ?", "Is the sky blue ?",
          "Is the bottom half of the image a bright yellow sun with dark shadow on the grass ?", "Yes",
          "Is there a zebra ?"]  # lengths 2 to 19 tokens (right padding), an unknown word
    images = [solid((30, 200, 60), bottom=(200, 30, 60)), solid((250, 250, 10)), solid((0, 0, 90), size=48),
              Image.new("RGB", (96, 40), (120, 10, 200))]  # two token counts: two prefill groups
    items = [(images[0], qs), (images[1], qs[2:5]), (images[2], []), (images[3], qs[::-1]), (images[2], qs[:1])]
    shared = v.logits_shared(items)
    assert v.model.model.rope_deltas is None  # explicit positions: the model's stored state is untouched
    for (image, questions), got in zip(items, shared):
        want = v.logits_naive(image, questions)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4 if len(questions) else True
    scores = v.score_many(items)
    v.shared_prefix = False
    naive = v.score_many(items)
    assert [len(s) for s in scores] == [len(q) for _, q in items]
    assert max(abs(a - b) for s, n in zip(scores, naive) for a, b in zip(s, n)) < 1e-4
    # the check is sensitive: 1-D positions (the image counted as its token count, not as max(h, w)) move the
    # logits by more than the tolerance
    v.model.model.get_rope_index = lambda ids, **kw: (torch.arange(ids.shape[1]).expand(3, *ids.shape), None)
    assert (v.logits_shared(items[:1])[0] - shared[0]).abs().max().item() > 1e-3


def load_run(url, pool, clients=16, requests_each=4, keep_alive=(True,), tol=1e-9):
    """`clients` threads start at once and each posts `requests_each` requests drawn from pool [(image, semantic,
    quality, expected scores)]; client k keeps one connection alive if keep_alive[k % len(keep_alive)], else it
    opens a new connection per request (as separate trainer processes do). Every request must be answered (no
    connection refused or reset) with its expected scores, and the server must count exactly the requests sent.
    Returns the server's counters for this run."""
    bodies = [{"images": [png_b64(im) for im, *_ in reqs], "semantic_questions": [s for _, s, _, _ in reqs],
               "quality_questions": [q for _, _, q, _ in reqs]} for reqs in pool]
    failed = []
    wrong = []
    start = threading.Barrier(clients)
    before = requests.get(url + "/health").json()

    def client(k):
        rng = random.Random(k)
        with requests.Session() as session:
            post = session.post if keep_alive[k % len(keep_alive)] else requests.post
            start.wait(timeout=30)
            for _ in range(requests_each):
                i = rng.randrange(len(pool))
                try:
                    r = post(url + "/score", json=bodies[i], timeout=60)
                except requests.ConnectionError as e:
                    failed.append(repr(e))
                    continue
                if r.status_code != 200:
                    wrong.append((i, r.status_code, r.text))
                    continue
                got = r.json()
                for (_, _, _, want), s, q in zip(pool[i], got["semantic_scores"], got["quality_scores"]):
                    if len(s + q) != len(want) or max((abs(a - b) for a, b in zip(s + q, want)), default=0) > tol:
                        wrong.append((i, s + q, want))

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    after = requests.get(url + "/health").json()
    assert not failed, f"{len(failed)} of {clients * requests_each} requests failed, e.g. {failed[0]}"
    assert not wrong, wrong[:3]
    counters = {k: after[k] - before[k] for k in ("requests", "batches", "images")}
    assert counters["requests"] == clients * requests_each
    return counters


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    """`reward_server.py --verifier toy` in its own process, as the trainer starts it; -> (url, its stderr log)."""
    log = tmp_path_factory.mktemp("toy_server") / "stderr.log"
    with open(log, "w") as err:
        proc, url = start_server("--verifier", "toy", stderr=err)
    try:
        yield url, log
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["new-connection-per-request", "keep-alive"])
def test_load_toy_server_64_clients(toy_server, keep_alive):
    """64 clients at once, 4 requests each (a few seconds on 2 CPU cores). With socketserver's listen backlog
    of 5, connections beyond it were reset (a few percent of the requests) and the server logged tracebacks."""
    url, log = toy_server
    rng = random.Random(0)
    toy = rs.ToyVerifier()
    qs = ["Is the image mostly green?", "Is the top half of the image red?", "Is the left half of the image blue?"]
    pool = []
    for _ in range(20):
        reqs = []
        for _ in range(rng.randint(1, 3)):
            im = solid(tuple(rng.randrange(256) for _ in range(3)), bottom=tuple(rng.randrange(256) for _ in range(3)))
            sem, qual = qs[:rng.randint(1, 3)], qs[:rng.randint(0, 2)]
            reqs.append((im, sem, qual, toy.score(im, sem + qual)))
        pool.append(reqs)
    counters = load_run(url, pool, clients=64, requests_each=4, keep_alive=(keep_alive,))
    assert counters["batches"] == counters["requests"]  # the toy cannot batch: merging would only add latency
    assert "Traceback" not in log.read_text()


def test_server_logs_a_client_that_hangs_up_in_one_line(toy_server):
    """A client that disconnects before its reply (a reset after the whole body; a close halfway through the
    body) costs the server one log line each, no traceback, and the server keeps serving."""
    url, log = toy_server
    q = "Is the image mostly green?"
    good = {"images": [png_b64(solid((0, 255, 0)))] * 8, "semantic_questions": [[q]] * 8,
            "quality_questions": [[]] * 8}
    body = json.dumps(good).encode()
    head = ("POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    lines = len(log.read_text().splitlines())
    for sent, reset in ((body, True), (body[:len(body) // 2], False)):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
            s.sendall(head.encode() + sent)
            if reset:  # close with a TCP reset instead of a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for _ in range(50):  # the server notices in its own time
            if len(log.read_text().splitlines()) > lines:
                break
            time.sleep(0.1)
        lines = len(log.read_text().splitlines())
    new = log.read_text().splitlines()[-2:]
    assert len(new) == 2 and all("hung up" in line for line in new), new
    assert "Traceback" not in log.read_text()
    assert requests.post(url + "/score", json=good).json()["rewards"][0] > 0.99


def test_load_transformers_verifier_16_clients(tiny_vlm):
    v = rs.TransformersVerifier(tiny_vlm, device="cpu", dtype="float32")
    rng = random.Random(1)
    qs = ["Is the image mostly green ?", "Is the top half of the image red ?", "Is the sky blue ?", "Is it dark ?"]
    pool = []
    for _ in range(8):  # expected scores from the verifier itself, before the server's worker owns it
        reqs = []
        for _ in range(rng.randint(1, 2)):
            im = solid(tuple(rng.randrange(256) for _ in range(3)), size=rng.choice([32, 48]))
            sem, qual = qs[:rng.randint(1, 4)], qs[:rng.randint(0, 2)]
            reqs.append((im, sem, qual, v.score(im, sem + qual)))
        pool.append(reqs)
    with serving(v) as (url, _):  # both client styles at once; images batched together: float32 sums in
        counters = load_run(url, pool, requests_each=3, keep_alive=(True, False), tol=1e-5)  # another order
    assert counters["images"] / counters["batches"] > 1.5


def test_a_bad_request_in_a_batch_fails_alone():
    class BatchingToy(rs.ToyVerifier):
        def score_many(self, items):
            time.sleep(0.02)
            return [self.score(image, questions) for image, questions in items]

    im, q = png_b64(solid((0, 0, 255))), "Is the image mostly blue?"
    good = {"images": [im], "semantic_questions": [[q]], "quality_questions": [[]]}
    bad = {**good, "semantic_questions": [["Is it a cat?"]]}
    with serving(BatchingToy(), batch_wait_s=0.05) as (url, _):
        with ThreadPoolExecutor(8) as ex:
            rs_ = list(ex.map(lambda b: requests.post(url + "/score", json=b), [good, bad] * 4))
        counters = requests.get(url + "/health").json()
    assert [r.status_code for r in rs_] == [200, 400] * 4
    s = rs.ToyVerifier().score(solid((0, 0, 255)), [q])[0]
    assert all(r.json()["rewards"] == [pytest.approx(math.sqrt(s))] for r in rs_[::2])  # quality list empty: 1.0
    assert counters["batches"] < 8


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible verifier backend (SGLang / vLLM)
# --------------------------------------------------------------------------------------------------


def top(**probs):
    return [{"token": t.replace("_", " "), "logprob": math.log(p)} for t, p in probs.items()]


CANNED = {  # question -> (top_logprobs, generated token)
    "Is the cat black?": (top(Yes=0.6, _yes=0.1, No=0.2, The=0.05), "Yes"),
    "Is the sky green?": (top(no=0.8, NO_=0.05, Yes=0.1), "no"),
    "Is it neither?": (top(Maybe=0.7, Perhaps=0.1), "Maybe"),
    "Is it a bare yes?": (top(Sure=0.5), "Yes"),
    "Is it flaky?": (top(Yes=0.9, No=0.1), "Yes"),
}


def fake_openai(calls: list, state: dict):
    """A stdlib /v1/chat/completions with canned answers; records each request body."""
    class Fake(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_request(self, *a):
            pass

        def send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state["lock"]:
                calls.append(body)
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                question = body["messages"][-1]["content"][-1]["text"]
                n = state.setdefault(question, 0) + 1
                state[question] = n
            time.sleep(0.05)
            with state["lock"]:
                state["in_flight"] -= 1
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": "no"})
            if question.startswith("You are a professional digital artist"):  # the pilot's holistic rating
                return self.send(200, {"choices": [{"message": {"content": state.get("holistic", "8")}}]})
            if question == "Is it down?" or (question == "Is it flaky?" and n <= 2):
                return self.send(503 if question == "Is it down?" else 500, {"error": "overloaded"})
            if question == "Is it rejected?":
                return self.send(400, {"error": "image too large"})
            if question == "Is it malformed?":
                return self.send(200, {"choices": []})
            if question == "Is it without logprobs?":  # as `transformers serve` answers: it ignores logprobs
                return self.send(200, {"choices": [{"message": {"content": "Yes"}, "logprobs": None}]})
            logprobs, token = CANNED[question]
            self.send(200, {"choices": [{"message": {"content": token},
                                         "logprobs": {"content": [{"token": token, "logprob": -0.1,
                                                                   "top_logprobs": logprobs}]}}]})
    return Fake


def test_openai_verifier_against_a_fake_endpoint():
    calls, state = [], {"lock": threading.Lock(), "in_flight": 0, "max_in_flight": 0}
    image = solid((10, 20, 30), bottom=(200, 100, 0))
    with serving(fake_openai(calls, state)) as (fake, _):
        v = rs.OpenAIVerifier(fake + "/v1", "fake-vlm", workers=4, backoff_s=0.01)
        with serving(v) as (url, _):
            body = {"images": [png_b64(image)] * 2, "semantic_questions": [list(CANNED)[:3], ["Is it flaky?"]],
                    "quality_questions": [["Is it a bare yes?"], []]}
            r = requests.post(url + "/score", json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["semantic_scores"] == [[pytest.approx(0.7 / 0.9), pytest.approx(0.1 / 0.95), 0.5],
                                              [pytest.approx(0.9)]]
            assert got["quality_scores"] == [[1.0], []]  # neither in the top 20, but the generated token is Yes
            health = requests.get(url + "/health").json()
            assert health["no_yes_no_in_top_logprobs"] == 2 and health["endpoint_retries"] == 2
            assert state["Is it flaky?"] == 3 and state["max_in_flight"] > 1  # questions sent concurrently
            sent = next(c for c in calls if c["messages"][-1]["content"][-1]["text"] == "Is the cat black?")
            assert {k: sent[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs")} == \
                {"model": "fake-vlm", "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
            system, user = sent["messages"]
            assert system == {"role": "system", "content": rs.STRICT_AUDITOR} and user["role"] == "user"
            assert [c["type"] for c in user["content"]] == ["image_url", "text"]  # the image before the question
            prefix, b64 = user["content"][0]["image_url"]["url"].split(",", 1)
            assert prefix == "data:image/png;base64"
            assert Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes() == image.tobytes()
            for question, code, msg in [("Is it down?", 503, "failed 5 tries"), ("Is it rejected?", 502, "HTTP 400"),
                                        ("Is it malformed?", 502, "top_logprobs"),
                                        ("Is it without logprobs?", 502, "does the server support logprobs?")]:
                r = requests.post(url + "/score", json={"images": [png_b64(image)], "semantic_questions": [[question]],
                                                        "quality_questions": [[]]})
                assert r.status_code == code and msg in r.json()["error"], (question, r.text)
            assert state["Is it down?"] == 5 and state["Is it rejected?"] == 1  # a 4xx is not retried


def test_holistic_score_reads_the_generated_number():
    for answer, score in [("8", 0.8), ("10", 1.0), ("Score: 7.", 0.7), ("7/10", 0.7), ("I rate it 9 out of 10", 0.9),
                          ("0", 0.0), ("8.0", 0.8), ("12", None), ("3.5", None), ("eleven", None), ("", None)]:
        assert rs.holistic_score(answer) == score, answer


def test_pilot_with_each_verifier(tmp_path, tiny_vlm, capsys):
    right, wrong = tmp_path / "right.png", tmp_path / "wrong.png"
    solid((0, 255, 0)).save(right)
    solid((0, 255, 0), bottom=(255, 0, 0)).save(wrong)
    qs = ["--question", "Is the top half of the image green?", "--question", "Is the bottom half of the image green?"]
    base = ["pilot", "--image", str(right), "--image", str(wrong), "--prompt", "a green image", *qs]
    # the toy judge: the decomposed scores separate the images; it has no holistic mode, and says so
    rows = rs.main(base)
    out = capsys.readouterr().out
    assert [r["image"] for r in rows] == [str(right), str(wrong)]
    assert all(r["holistic"] is None and r["answer"] is None for r in rows) and "no holistic mode" in out
    assert rows[0]["semantic_scores"][1] > 0.99 and rows[1]["semantic_scores"][1] < 0.01
    for r in rows:
        assert r["dvreward"] == pytest.approx(rs.dvreward(r["semantic_scores"], r["quality_scores"]))
    # a tiny random Qwen3-VL: its greedy answer is read, and a word salad gives no score rather than a guess
    rows = rs.main(base + ["--verifier", tiny_vlm])
    for r in rows:
        assert isinstance(r["answer"], str) and r["holistic"] == rs.holistic_score(r["answer"])
        assert len(r["semantic_scores"]) == 2 and all(0 < s < 1 for s in r["semantic_scores"])
        assert r["dvreward"] == pytest.approx(math.sqrt(sum(r["semantic_scores"]) / 2))
    # an OpenAI-compatible endpoint: the holistic request is a plain generation with the image first
    calls, state = [], {"lock": threading.Lock(), "in_flight": 0, "max_in_flight": 0, "holistic": "Score: 7"}
    with serving(fake_openai(calls, state)) as (fake, _):
        capsys.readouterr()
        rows = rs.main(["pilot", "--image", str(right), "--prompt", "a green cat", "--question", "Is the cat black?",
                        "--verifier", f"openai:{fake}/v1", "--model", "fake-vlm"])
    assert rows[0]["holistic"] == 0.7 and rows[0]["semantic_scores"] == [pytest.approx(0.7 / 0.9)]
    assert "0.7000  (the verifier's generated answer 'Score: 7', / 10)" in capsys.readouterr().out
    sent = next(c for c in calls if "max_tokens" in c and c["max_tokens"] > 1)
    (user,) = sent["messages"]
    assert [c["type"] for c in user["content"]] == ["image_url", "text"] and sent["temperature"] == 0
    assert user["content"][1]["text"] == rs.HOLISTIC_INSTRUCTION.format(prompt="a green cat")
    # no question: argparse names the flag
    with pytest.raises(SystemExit):
        rs.main(["pilot", "--image", str(right), "--prompt", "p"])
    assert "--question" in capsys.readouterr().err


def test_confidence_from_top_logprobs():
    s, found = rs.confidence_from_top_logprobs(top(Yes=0.3, _YES=0.1, No_=0.2, no=0.2), "Yes")
    assert found and s == pytest.approx(0.4 / 0.8)
    assert rs.confidence_from_top_logprobs(top(Yes=0.3), "Yes") == (1.0, True)  # no below the top 20
    assert rs.confidence_from_top_logprobs([], " no") == (0.0, False)
    assert rs.confidence_from_top_logprobs(top(Hmm=0.9), "Hmm") == (0.5, False)


# --------------------------------------------------------------------------------------------------
# Decomposition (Sec. 4.2, offline)
# --------------------------------------------------------------------------------------------------


def q(question, tag):
    return {"question": question, "tag": tag}


APPLE = {"semantic_questions": [
    q("Is there an apple?", "Existence"), q("Is the apple red?", "Attribute"), q("Is the apple on a table?", "Spatial"),
    q("Is the apple red or green?", "Attribute"),           # a choice
    q("Is the apple fresh and tasty?", "Attribute"),        # not visual
    q("What colour is the apple?", "Attribute"),            # not yes/no
    q("Is there an  apple ?", "Existence"),                  # duplicate
    q("Is the apple shiny", "Attribute"),                   # no question mark
    q("Is the apple big?", "Size"),                         # unknown tag
    "Is the apple whole?"],                                 # not an object
    "quality_questions": [
    q("Is the apple round with a short stem?", "Geometry"), q("Does the table show a wood grain?", "Texture"),
    q("Is the apple blurry?", "Texture"),                   # yes would be a defect
    q("Is the coffee hot?", "Physics"),                     # not visual
    q("Is it?", "Geometry")]}                               # too short
CAT = {"semantic_questions": [q("Is there a cat?", "Existence"), q("Is the cat free of a collar?", "Negative"),
                              q("Is there a collar on the cat?", "Negative")],  # yes would be bad
       "quality_questions": [q("Does the cat have two symmetric ears?", "Anatomy")]}
NO_SEMANTIC = {"semantic_questions": [q("Describe the dog.", "Existence")], "quality_questions": []}


def chat_endpoint(answer, calls: list):
    """An OpenAI-compatible chat endpoint (a handler class) that records each request and answers with
    answer(messages)."""
    class Fake(BaseHTTPRequestHandler):
        def log_request(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                        "content": answer(body["messages"])}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
    return Fake


def fake_llm(calls: list):
    def answer(messages):
        prompt = messages[1]["content"].removeprefix("Prompt: ")
        if prompt.startswith("A red apple"):
            return "Here you go:\n```json\n" + json.dumps(APPLE) + "\n```"
        if prompt.startswith("A cat"):
            return json.dumps(CAT)
        if prompt.startswith("A dog"):
            return json.dumps(NO_SEMANTIC)
        if prompt.startswith("Fixed on retry") and len(messages) > 2:
            return json.dumps(CAT)
        return "Sorry, I cannot help with that."

    return chat_endpoint(answer, calls)


def test_decompose_with_a_fake_llm(tmp_path, capsys):
    src = tmp_path / "prompts.in"
    src.write_text("\n".join([
        json.dumps({"prompt": "A red apple on a table.", "task": "color", "difficulty": "easy", "split": "train"}),
        "A cat without a collar.",
        json.dumps({"prompt": "Unparseable prompt.", "split": "test"}),
        "",
        "A dog.",
        json.dumps({"prompt": "Fixed on retry.", "task": "t"}),
        '{"no prompt": 1}',
    ]) + "\n")
    out, calls = tmp_path / "out.jsonl", []
    with serving(fake_llm(calls)) as (fake, _):
        rs.main(["decompose", str(src), "--llm", fake + "/v1", "--model", "fake-llm", "--out", str(out)])
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["A red apple on a table.", "A cat without a collar.", "Fixed on retry."]
    assert rows[0] == {"prompt": "A red apple on a table.",
                       "semantic_questions": APPLE["semantic_questions"][:3], "quality_questions": [
                           q("Is the apple round with a short stem?", "Geometry"),
                           q("Does the table show a wood grain?", "Texture")],
                       "task": "color", "difficulty": "easy", "split": "train"}  # other fields carried through
    assert rows[1]["semantic_questions"] == CAT["semantic_questions"][:2] and rows[2]["task"] == "t"
    assert len(ag.load_prompts(str(out), split=None)) == 3  # the trainer reads what decompose writes
    for text in ["prompts.in:3: the LLM answer is not valid JSON after a retry", "prompts.in:5: no valid semantic",
                 "prompts.in:7: not a JSON object", "'Is the apple red or green?': not atomic",
                 "'Is the coffee hot?': not visual", "'What colour is the apple?': not a yes/no",
                 "'Is the apple blurry?': 'yes' would mean a defect", "'Is there an  apple ?': duplicate",
                 "'Is there a collar on the cat?': a Negative question", "'Is it?': length"]:
        assert text in printed.err, text
    assert "skipped 3 rows" in printed.out and "dropped 13 of 24 questions" in printed.out
    first = calls[0]
    assert first["model"] == "fake-llm" and first["messages"][0] == {"role": "system",
                                                                     "content": rs.DECOMPOSE_INSTRUCTION}
    retried = [c for c in calls if c["messages"][1]["content"] == "Prompt: Unparseable prompt."]
    assert len(retried) == 2 and "not valid" in retried[1]["messages"][-1]["content"]


def synthesizing_llm(calls: list):
    """A scripted LLM for `synthesize`: a prompt made of the sampled elements; the same words for every 'style'
    prompt (near-duplicates); nothing usable for hard 'negation' prompts; and a decomposition of each prompt,
    invalid for the prompts with 'three' in them (no semantic question survives)."""
    def answer(messages):
        first = messages[0]["content"]
        if first == rs.DECOMPOSE_INSTRUCTION:
            prompt = messages[1]["content"].removeprefix("Prompt: ")
            thing = prompt.split()[3].strip(",.")
            return json.dumps(NO_SEMANTIC if " three " in prompt else {
                "semantic_questions": [q(f"Is there a {thing}?", "Existence")],
                "quality_questions": [q("Is the main object in focus?", "Aesthetics")]})
        task = re.search(r'for the task "([^"]+)"', first).group(1)
        if task == "style":
            return "A watercolour painting of a quiet harbour, boats resting at dawn."
        if task == "negation" and "Difficulty hard" in first:
            return "Sure!"
        elements = json.loads(re.search(r"smallest change\): (.*?)\. Difficulty", first).group(1))
        words = [w for v in elements.values() for w in (v if isinstance(v, list) else [v])]
        return "A scene showing " + ", ".join(words) + f", for {task}."

    return chat_endpoint(answer, calls)


def test_synthesize_makes_a_prompt_set_with_exact_tiers_and_resumes(tmp_path, capsys):
    out, calls = tmp_path / "synth.jsonl", []
    tasks = "2d_spatial_relation,color+2d,style,negation"
    flags = ["--model", "fake", "--out", str(out), "--per-task", "10", "--test-per-task", "4", "--tasks", tasks]
    with serving(synthesizing_llm(calls)) as (fake, _):
        rs.main(["synthesize", "--llm", fake + "/v1", *flags])
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        dropped = [json.loads(x) for x in (tmp_path / "synth.jsonl.dropped.jsonl").read_text().splitlines()]
        printed = capsys.readouterr().out
        count = lambda rs_, **kv: sum(all(r[k] == v for k, v in kv.items()) for r in rs_)  # noqa: E731
        for task in ("2d_spatial_relation", "color+2d"):  # exact 3:5:2 tiers (train 10: 3/5/2; test 4: 1/2/1)
            want = {("train", "easy"): 3, ("train", "medium"): 5, ("train", "hard"): 2, ("test", "easy"): 1,
                    ("test", "medium"): 2, ("test", "hard"): 1}
            assert {k: count(rows, task=task, split=k[0], difficulty=k[1]) for k in want} == want, task
        # one of the identical style prompts is kept; the others are dropped as near-duplicates, each of the
        # 14 prompts drawn at most 3 times (or not asked at all when its primitives were drawn before)
        assert count(rows, task="style") == 1 and count(dropped, task="style") == 3 * 14 - 1
        assert count(dropped, task="style", why="a near-duplicate of a kept prompt") >= 30
        # hard negation: a non-prompt, retried once (2 calls), then dropped with its reason, 3 draws a prompt
        assert count(rows, task="negation", difficulty="hard") == 0
        assert count(dropped, task="negation", difficulty="hard") == 3 * 3
        asked = count(dropped, task="negation", difficulty="hard", why="the LLM wrote no prompt after a retry")
        hard_negation = [c for c in calls if 'for the task "negation"' in c["messages"][0]["content"]
                         and "Difficulty hard" in c["messages"][0]["content"]]
        assert asked >= 7 and len(hard_negation) == 2 * asked  # each asked once and retried once
        retries = [c for c in hard_negation if len(c["messages"]) == 3]  # the answer, then told what was wrong
        assert len(retries) == asked and all("not a prompt" in c["messages"][-1]["content"] for c in retries)
        # a prompt whose decomposition leaves no semantic question is dropped and counted
        assert all(" three " not in r["prompt"] for r in rows)
        assert all(r["why"] == "no valid semantic question left" for r in dropped if " three " in r.get("prompt", ""))
        assert len({r["prompt"] for r in rows}) == len(rows)  # no duplicate text
        assert len({(r["task"], json.dumps(r["primitives"], sort_keys=True)) for r in rows}) == len(rows)
        assert "| 2d_spatial_relation | 4 / 4, 7 / 7, 3 / 3 | - |" in printed
        assert len(ag.load_prompts(str(out), split=None)) == len(rows)  # the trainer reads it
        assert {r["split"] for r in ag.load_prompts(str(out), split="test")} == {"test"}
        # killed mid-file: the last line half written; the rerun completes it, no duplicate and no loss
        text = out.read_text()
        cut = text.rindex("\n", 0, len(text) // 2) + 20
        out.write_text(text[:cut])
        before = len(text[:cut].splitlines()) - 1
        n_calls = len(calls)
        rs.main(["synthesize", "--llm", fake + "/v1", *flags])
        again = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(again) == len(rows) and len({r["prompt"] for r in again}) == len(again)
        assert [r["prompt"] for r in again[:before]] == [r["prompt"] for r in rows[:before]]
        for k in want:
            assert count(again, task="color+2d", split=k[0], difficulty=k[1]) == want[k]
        assert len(calls) > n_calls
        n_calls = len(calls)
        rs.main(["synthesize", "--llm", fake + "/v1", *flags])  # complete: nothing is asked again
        assert len(calls) == n_calls and out.read_text().count("\n") == len(again)


def test_synthesize_refuses_a_malformed_pool(tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({**rs.DEFAULT_POOL, "colours": ["red", ""]}))
    with pytest.raises(SystemExit, match="pool.json: 'colours' must be a non-empty list of non-empty strings"):
        rs.main(["synthesize", "--llm", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o"), "--pool", str(pool)])
    pool.write_text("[1, 2")
    with pytest.raises(SystemExit, match="cannot read a JSON pool"):
        rs.main(["synthesize", "--llm", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o"), "--pool", str(pool)])
    with pytest.raises(SystemExit):
        rs.main(["synthesize", "--llm", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o"), "--tasks", "colour"])
    assert not (tmp_path / "o").exists()


def test_question_validation_keeps_the_curated_questions():
    """The repo's hand-checked prompts.jsonl: only questions with 'or' (a choice) are dropped, under 5 %."""
    rows = [json.loads(line) for line in open(os.path.join(HERE, "prompts.jsonl"))]
    reasons, total = [], 0
    for row in rows:
        seen = set()
        for key, tags, quality in (("semantic_questions", rs.SEMANTIC_TAGS, False),
                                   ("quality_questions", rs.QUALITY_TAGS, True)):
            total += len(row[key])
            reasons += [r for _, r in rs.validate_questions(row[key], tags, quality, seen)[1]]
    assert len(reasons) < 0.05 * total and all(r.startswith("not atomic ('or'") for r in reasons)


def test_decompose_with_a_local_transformers_llm(tmp_path, tiny_vlm, capsys):
    """The local path runs end to end on a tiny random causal LM; its answers are noise, so every row is
    reported as unparseable, never written half-valid."""
    import shutil

    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    path = tmp_path / "llm"
    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    tok.chat_template = rs.TOY_CHAT_TEMPLATE
    tok.save_pretrained(path)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(path)
    src = tmp_path / "in.txt"
    src.write_text("A red apple.\nA blue sky.\n")
    rs.main(["decompose", str(src), "--llm", str(path), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4",
             "--device", "cpu"])
    printed = capsys.readouterr()
    assert "skipped 2 rows" in printed.out and "in.txt:2: the LLM answer is not valid JSON" in printed.err
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_score_command(tmp_path):
    image = tmp_path / "x.png"
    solid((0, 255, 0), bottom=(255, 0, 0)).save(image)
    res = subprocess.run([sys.executable, os.path.join(HERE, "reward_server.py"), "score", "--image", str(image),
                          "--question", "Is the top half of the image green?", "--question",
                          "Is the bottom half of the image red?", "--quality-question", "Is the image mostly blue?"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 4 and lines[0].endswith("Is the top half of the image green?")
    scores = [float(line.split()[0]) for line in lines[:3]]
    assert scores[0] > 0.99 and scores[1] > 0.99 and scores[2] < 0.05
    assert lines[3].startswith("R = ") and float(lines[3].split()[-1]) == pytest.approx(
        math.sqrt((scores[0] + scores[1]) / 2 * scores[2]), abs=1e-3)


def test_commands_name_a_missing_or_unreadable_input_in_one_line(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    q = ["--question", "Is the image mostly green?"]
    for argv, named in [(["score", "--image", str(tmp_path / "missing.png"), *q], "missing.png"),
                        (["score", "--image", str(not_an_image), *q], "notes.png"),
                        (["score", "--image", str(tmp_path), *q], str(tmp_path)),
                        (["pilot", "--image", str(tmp_path / "missing.png"), "--prompt", "p", *q], "missing.png"),
                        (["decompose", str(tmp_path / "missing.txt"), "--llm", "http://127.0.0.1:9/v1",
                          "--out", str(tmp_path / "o.jsonl")], "missing.txt"),
                        (["decompose", str(not_utf8), "--llm", "http://127.0.0.1:9/v1", "--out",
                          str(tmp_path / "o.jsonl")], "latin1.txt")]:
        res = subprocess.run([sys.executable, os.path.join(HERE, "reward_server.py"), *argv], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 1 and named in res.stderr, res.stderr


def test_serve_command_prints_its_port_and_takes_the_token_from_the_environment():
    proc, url = start_server("--verifier", "toy", env={**os.environ, "ALPHAGRPO_REWARD_TOKEN": "t0k"})
    try:
        assert requests.get(url + "/health").json()["verifier"] == "toy"
        body = {"images": [], "semantic_questions": [], "quality_questions": []}
        assert requests.post(url + "/score", json=body).status_code == 401
        r = requests.post(url + "/score", json=body, headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200 and r.json() == {"rewards": [], "semantic_scores": [], "quality_scores": []}
    finally:
        proc.kill()
        proc.wait()


def test_bench_command_runs_at_a_tiny_size(capsys):
    rs.main(["bench", "--image-px", "64", "--hidden", "32", "--layers", "1", "--questions", "4", "--images", "2",
             "--clients", "2", "--seconds", "0.5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "questions/s, one image per call" in out and "latency p99 (ms)" in out and "ratio" in out
    assert float(out.split("x the floor")[0].rsplit(",", 1)[1]) > 0  # the shared path beside the one-pass floor
    assert float(out.split("max |shared - naive| score difference:")[1]) < 1e-4


def test_a_killed_trainer_leaves_no_toy_server():
    import signal

    code = ("import sys; sys.path.insert(0, %r); import alphagrpo as ag; p, u = ag.start_reward_server(); "
            "print(p.pid, flush=True); import time; time.sleep(60)" % HERE)
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(trainer.stdout.readline())
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/status") as f:
                if "zombie" in f.read():
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the toy reward server outlived the trainer that started it")


def test_torchrun_two_processes_reproduce_one(toy_dirs, tmp_path):
    """The whole loop under torchrun (gloo, CPU): groups split over two ranks, gradients all-reduced,
    metrics and evaluation gathered on rank 0. Seeds depend on (seed, step, group) and update shares on
    group indices, so two processes reproduce one process's rows up to float rounding. --task mix: each SRR
    group refines an RT2I group's image on its own rank, and FPR's step rule sees every rank's groups."""
    flags = ["--reasoner", toy_dirs[0], "--renderer", toy_dirs[1], "--steps", "2", "--group-size", "4",
             "--groups-per-step", "4", "--eval-every", "1", "--save-every", "0", "--sample-every", "0",
             "--task", "mix"]
    _, args, _ = ag.parse_args(flags + ["--out", str(tmp_path / "one")])
    ag.train(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), os.path.join(HERE, "alphagrpo.py")] + flags + ["--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done:") == 1  # only rank 0 speaks (and writes)
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(one) == len(two) == 3  # two steps and the final evaluation
    for a, b in zip(one, two):
        for k in ("reward_mean", "reward_std", "eval_reward", "eval_forced_plan", "text_loss", "image_loss",
                  "score_Spatial", "reward_init_mean", "improved_frac", "all_failed_frac", "skipped_frac"):
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_gradient_checkpointing_is_active_and_changes_no_log_prob(toy_dirs):
    """With checkpointing a block's forward runs again during backward; the log-probs must not change."""
    policy, args = make_policy(toy_dirs, group_size=3, gradient_checkpointing=True)
    randomize_lora(policy)
    g = rollout(policy, args, seed=5)
    calls = {"text": 0, "image": 0}

    def count(module, key):  # wrap the forward of a module inside a checkpointed block (hooks do not rerun)
        forward = module.forward
        module.forward = lambda *a, **kw: calls.__setitem__(key, calls[key] + 1) or forward(*a, **kw)

    count(policy.reasoner.model.model.language_model.layers[0].mlp, "text")
    count(policy.renderer.transformer.transformer_blocks[0].norm1, "image")
    logp = policy.reasoner.token_logprobs(g.text)
    assert torch.equal(logp.detach() * g.text.mask, g.text.old_logp * g.text.mask)
    logp.sum().backward()
    assert calls["text"] == 2  # forward, then the recomputation in backward
    loss, _ = ag.group_loss(policy, g, args)
    before = calls["image"]
    loss.backward()
    assert calls["image"] - before == g.image.latents.shape[1] - 1  # one recomputation per trained step


# --------------------------------------------------------------------------------------------------
# FLUX.2 klein: the renderer that edits, and SRR in context
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def klein_dirs(toy_dirs, tmp_path_factory):
    return toy_dirs[0], ag.build_toy_klein(str(tmp_path_factory.mktemp("klein") / "renderer"))


def klein_stock(renderer, cond, x_T, steps, guidance, image=None):
    """Flux2KleinPipeline itself from the same x_T and embeddings; its latents in our (normalized, patchified)
    space."""
    G, res = len(x_T), renderer.args.resolution
    out = renderer.pipe(latents=x_T, prompt_embeds=cond[0][G:], negative_prompt_embeds=cond[0][:G], image=image,
                        num_inference_steps=steps, guidance_scale=guidance, height=res, width=res, output_type="latent",
                        max_sequence_length=renderer.args.max_text_tokens,
                        text_encoder_out_layers=renderer.text_layers).images  # (G, 4, 2h, 2w), un-normalized
    return (renderer.pipe._patchify_latents(out) - renderer.bn_mean) / renderer.bn_std


def test_klein_ode_sampler_equals_the_pipeline_for_generation_and_editing(klein_dirs):
    """Our sampler at noise 0 is Flux2KleinPipeline (dynamic-shift sigmas, CFG, packed tokens, timestep / 1000),
    for text-to-image and for editing with a reference image (the pipeline's image=; it needs >= 64 px)."""
    policy, args = make_policy(klein_dirs, resolution=64, num_steps=5, guidance_scale=3.0)
    renderer, G = policy.renderer, 2
    randomize_lora(policy)
    x_T = renderer.noise(G, torch.Generator().manual_seed(0))
    sigmas = renderer.sigmas(args.num_steps)
    cond = renderer.encode(["the bottom half is green"] * G)
    ours = ag.render(renderer, cond, x_T, sigmas, range(0), 0.0)[0]
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, klein_stock(renderer, cond, x_T, 5, 3.0), atol=1e-5, rtol=1e-5)
    reference = Image.new("RGB", (64, 64), (200, 30, 30))
    cond_edit = renderer.encode(["the bottom half is green"] * G, reference=renderer.encode_image(reference))
    edited = ag.render(renderer, cond_edit, x_T, sigmas, range(0), 0.0)[0]
    torch.testing.assert_close(edited, klein_stock(renderer, cond_edit, x_T, 5, 3.0, [reference]), atol=1e-5, rtol=1e-5)
    assert (edited - ours).abs().max() > 1e-3  # the reference is in the context: it changes the result


def test_klein_edit_velocity_depends_on_the_reference_image(klein_dirs):
    policy, args = make_policy(klein_dirs)
    r = policy.renderer
    x = r.noise(2, torch.Generator().manual_seed(0))
    refs = [r.encode_image(Image.new("RGB", (32, 32), c)) for c in ((255, 0, 0), (0, 0, 255))]
    v = [r.velocity(x, 0.8, r.encode(["fix the colour"] * 2, reference=ref)) for ref in refs]
    v_none = r.velocity(x, 0.8, r.encode(["fix the colour"] * 2))
    assert (v[0] - v[1]).abs().max() > 1e-4 and (v[0] - v_none).abs().max() > 1e-4
    # guidance 1.0 is the conditional half alone: equal to CFG's conditional branch recovered from two scales,
    # v_g = v_u + g (v_c - v_u), so v_c = v_2 - (v_3 - v_2); below 1 guidance is off too, as in the pipeline
    cond = r.encode(["fix the colour"] * 2, reference=refs[0])
    v1, v2, v3 = (r.velocity(x, 0.8, cond, guidance=g) for g in (1.0, 2.0, 3.0))
    torch.testing.assert_close(v1, v2 - (v3 - v2), atol=1e-5, rtol=1e-4)
    assert torch.equal(r.velocity(x, 0.8, cond, guidance=0.5), v1)


@pytest.mark.parametrize("task,temperature", [("rt2i", 1.0), ("srr", 1.0), ("rt2i", 0.7), ("srr", 0.7)])
def test_klein_first_update_ratio_is_exactly_one(klein_dirs, task, temperature):
    """RT2I and SRR in context, at temperature 1 and another one (scoring that forgot the temperature would
    pass at 1 only): the stored log-probs are what the first update computes, with non-zero LoRA."""
    policy, args = make_policy(klein_dirs, group_size=4, temperature=temperature)
    randomize_lora(policy)
    g = rollout(policy, args, task=task)
    if task == "srr":
        assert g.image.cond[2] is not None  # the initial image's tokens are in the context
    with torch.no_grad():
        text, image = current_logps(policy, g, args)
    assert torch.equal(text * g.text.mask, g.text.old_logp * g.text.mask)
    assert torch.equal(image, g.image.old_logp)
    loss, stats = ag.group_loss(policy, g, args)
    assert stats["text_clipfrac"] == 0 and stats["image_clipfrac"] == 0
    # the check has teeth: scoring at another temperature would not match
    policy.reasoner.temperature = temperature + 0.3
    with torch.no_grad():
        assert not torch.allclose(policy.reasoner.token_logprobs(g.text) * g.text.mask, g.text.old_logp * g.text.mask)


@pytest.mark.parametrize("task,refine", [("rt2i", "auto"), ("srr", "edit"), ("srr", "sdedit")])
def test_the_trained_window_never_holds_the_last_step(klein_dirs, task, refine):
    """Over many draws of the window start (SDEdit's window starts late), the last trained step always has a
    non-zero sigma_next: the last step (sigma_next = 0) is never scored."""
    policy, args = make_policy(klein_dirs, group_size=2, num_steps=8, sde_window=2, sde_window_start_max=2,
                               srr_refine=refine, srr_strength=0.6)
    starts = set()
    for seed in range(6):
        g = rollout(policy, args, task=task, seed=seed)
        sig = g.image.sigmas  # (W+1,): the window's sigmas and the one after its last step
        assert len(sig) >= 2 and float(sig[-1]) > 0, sig
        starts.add(float(sig[0]))
    sigmas = policy.renderer.sigmas(args.num_steps)
    for start in range(len(sigmas) - 2):
        for seed in range(20):
            w = ag.sde_window(start, len(sigmas), args, torch.Generator().manual_seed(seed))
            assert w.stop <= len(sigmas) - 2  # the last step's index is len(sigmas) - 2
    assert len(starts) > 1  # the start was really drawn


def test_klein_srr_initial_image_gets_no_gradient(klein_dirs):
    policy, args = make_policy(klein_dirs, group_size=4)
    randomize_lora(policy)
    row = TOY_PROMPTS[0]
    gen = torch.Generator().manual_seed(0)
    images, fut = ag.initial_candidates(policy, row, args, gen, LocalClient())
    image, reward = ag.pick_initial(images, fut.result()["rewards"], "min", gen)
    init_latents = policy.renderer.encode_image(image).requires_grad_(True)
    g = ag.rollout_group(policy, row, "srr", args, gen, LocalClient(), policy.renderer.sigmas(args.num_steps),
                         (image, init_latents, reward))
    ag.collect_rewards_and_fpr(g, args)
    ag.assign_advantages([g], args)
    assert g.image.cond[2] is not None and not g.image.cond[2].requires_grad
    loss, _ = ag.group_loss(policy, g, args)
    loss.backward()
    assert init_latents.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.renderer.lora_params)


def test_klein_lora_export_loads_in_diffusers_and_merges(klein_dirs, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    policy, args = make_policy(klein_dirs, lora_rank=4, lora_alpha=12.0)
    randomize_lora(policy, scale=0.2)
    ag.export_lora(policy, args, str(tmp_path))
    sd = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "renderer"))  # what load_lora_weights reads
    sd = sd[0] if isinstance(sd, tuple) else sd
    base = Flux2Transformer2DModel.from_pretrained(klein_dirs[1], subfolder="transformer")
    modules = dict(base.named_modules())
    wrapped = {n for n, m in policy.renderer.transformer.named_modules() if isinstance(m, ag.LoRALinear)}
    assert {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd} == wrapped
    assert any("single_transformer_blocks" in n and n.endswith("attn.to_out") for n in wrapped)  # MLP/fused too
    assert any(n.endswith("ff.linear_in") for n in wrapped)
    merge_exported_lora(sd, modules, rank=4)
    r = policy.renderer
    x = r.noise(2, torch.Generator().manual_seed(0))
    cond = r.encode(["a red top"] * 2)
    ours = r.velocity(x, 0.7, cond)
    r.transformer, kept = base, r.transformer
    merged = r.velocity(x, 0.7, cond)
    r.transformer = kept
    assert torch.allclose(ours, merged, atol=1e-5)
    with ag.lora_disabled(r.transformer):
        assert not torch.allclose(r.velocity(x, 0.7, cond), merged, atol=1e-3)


def test_cheap_checks_come_before_any_model_loads(klein_dirs, toy_dirs, tmp_path, monkeypatch):
    """A missing --reward-url, an unknown renderer kind and SD3 asked to edit stop with a clear error before a
    model loads (on a user's machine: before gigabytes download)."""
    monkeypatch.setattr(ag, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the checks"))
    with pytest.raises(SystemExit, match="--reward-url is required"):
        ag.main(["--preset", "klein", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="Stable Diffusion 3 can only refine by --srr-refine sdedit"):
        ag.main(["--reasoner", toy_dirs[0], "--renderer", toy_dirs[1], "--srr-refine", "edit", "--task", "srr",
                 "--out", str(tmp_path / "b")])
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(SystemExit, match="unknown renderer kind 'KandinskyPipeline'"):
        ag.main(["--reasoner", toy_dirs[0], "--renderer", str(other), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="cannot read the renderer"):
        ag.main(["--reasoner", toy_dirs[0], "--renderer", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])


def test_klein_dry_run_has_the_published_parameter_counts(capsys):
    """--dry-run --preset klein builds FLUX.2-klein-base-4B's parts on the meta device from the embedded configs:
    the transformer of its published config.json (5 double + 20 single blocks, 24 x 128 heads), Qwen3-4B
    (model card: 4.0B) and the FLUX.2 VAE (84.0M)."""
    _, args, _ = ag.parse_args(["--preset", "klein", "--dry-run", "--device", "cpu"])
    rows = {name: n for name, n, _ in ag.dry_run(args)}
    assert rows["renderer.transformer"] == 3_875_544_576
    assert rows["renderer.text_encoder (Qwen3)"] == pytest.approx(4.02e9, rel=2e-3)
    assert rows["renderer.vae"] == pytest.approx(84.0e6, rel=2e-3)
    assert rows["reasoner"] == 4_437_815_808
    out = capsys.readouterr().out
    assert "total (estimate)" in out and "fits" in out


def test_cosmos3_edge_dry_run_builds_the_edge_shapes(capsys):
    """--dry-run --preset cosmos3-edge builds Cosmos3-Edge's reasoner (Cosmos3EdgeForConditionalGeneration) and
    generator on the meta device, counted by hand from Edge's config: the language model (untied embedding
    and head of 131072 x 2048; 28 layers of q/o 2048 x 2048, k/v 2048 x 1024, relu2 MLP 2 x 2048 x 9216 and
    two norms; the final norm) and the generation stream (the same layer shapes, plus its q/k norms and the
    understanding-key norm of 128, the final norm, proj_in/out 192 <-> 2048, the time embedder 256 -> 2048
    -> 2048), the shared stream counted once; and the fit per card."""
    _, args, _ = ag.parse_args(["--preset", "cosmos3-edge", "--dry-run", "--device", "cpu"])
    policy = ag.random_policy(args, torch.device("meta"))
    lm = policy.reasoner.model.model.language_model
    assert type(policy.reasoner.model).__name__ == "Cosmos3EdgeForConditionalGeneration"
    layer = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 2 * 2048 * 9216 + 2 * 2048
    base = sum(p.numel() for n, p in lm.named_parameters() if ".lora_" not in n)
    head = policy.reasoner.model.lm_head.weight.numel()
    assert base + head == 2 * 131072 * 2048 + 28 * layer + 2048
    assert policy.renderer.transformer.layers[0].mlp.up_proj is lm.layers[0].mlp.fc1  # one network
    rows = {name: n for name, n, _ in ag.dry_run(args)}
    gen = 28 * (layer + 3 * 128) + 2048 + (192 * 2048 + 2048) + (2048 * 192 + 192) + (256 * 2048 + 2048) + (
        2048 * 2048 + 2048)
    assert rows["renderer.transformer (generation stream)"] == gen
    out = capsys.readouterr().out
    assert "on a 24 GB card: fits G up to" in out and "cosmos3-edge preset" in out


# --------------------------------------------------------------------------------------------------
# The toy world: priors, plan accuracy, which half trains, curves
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_world():
    """The default toy world (built once and cached, as `python alphagrpo.py` does; CI's first command builds it)."""
    args = ag.Args()
    reasoner, renderer, _ = ag.model_paths(args)
    ag.build_toy_world(ag.toy_world_dir(args))
    return reasoner, renderer


def test_toy_world_priors_follow_explicit_requests(toy_world):
    """The renderer's prior draws what an explicit caption or a plan says far above chance, also after an implicit
    prompt it never saw; the reasoner's prior restates explicit requests (test wordings, never seen by the priors)
    and spreads its guesses over the targets on implicit prompts: GRPO's exploration starts from there."""
    policy, args = make_policy(toy_world)
    verifier, targets = rs.ToyVerifier(), ag.toy_targets()
    renderer, sigmas = policy.renderer, policy.renderer.sigmas(args.eval_num_steps)
    questions = [f"Is the {t['region']} half of the image {t['colour']}?" for t in targets]
    explicit = [ag.TOY_EXPLICIT["test"][k % 2].format(**t) for k, t in enumerate(targets)]
    for captions in (explicit, [ag.renderer_text("a calm sea below", ag.toy_plan(t)) for t in targets]):
        with torch.no_grad():
            x0 = ag.render(renderer, renderer.encode(captions),
                           renderer.noise(len(targets), torch.Generator().manual_seed(0)), sigmas, range(0), 0.0)[0]
        scores = [verifier.score(im, questions) for im in renderer.decode(x0)]  # (8 images, 8 questions)
        own = sum(s[k] for k, s in enumerate(scores)) / len(targets)
        chance = sum(map(sum, scores)) / len(targets) ** 2
        assert own >= 0.8 and chance <= 0.3, (own, chance)  # measured: 1.00 / 1.00 against 0.12 / 0.13
    torch.manual_seed(0)
    plans = [policy.reasoner.generate(ag.RT2I_INSTRUCTION.format(prompt=c), None, 1).texts[0] for c in explicit]
    assert sum(map(ag.plan_names_target, plans, targets)) >= 6, plans  # measured: 7; chance: 1 in 8
    implicit = [r for r in ag.TOY_WORLD_PROMPTS if r["kind"] == "implicit" and r["split"] == "train"]
    guesses = [policy.reasoner.generate(ag.RT2I_INSTRUCTION.format(prompt=r["prompt"]), None, 16) for r in implicit]
    right = [ag.plan_accuracy(g.texts, [r["target"]] * 16) for g, r in zip(guesses, implicit)]
    named = [next((t for t in targets if ag.plan_names_target(y, t)), None) for g in guesses for y in g.texts]
    assert 0.03 <= sum(right) / len(right) <= 0.3, right  # measured: 0.17 (chance 1/8)
    assert all(named.count(t) >= len(named) / 40 for t in targets), named  # measured: each >= 28 of 512


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to see whether a build's process is alive")
def test_a_killed_toy_world_build_is_swept(tmp_path):
    """A killed build leaves its .building-<pid>-* folder (a kill skips the cleanup); the next call removes those
    whose process is gone and keeps a live one's (another process may be building)."""
    folder = tmp_path / "toy-0123"
    folder.mkdir()
    (folder / "build.json").write_text("{}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".building-{dead.stdout.strip()}-x", tmp_path / f".building-{os.getpid()}-y"
    stale.mkdir()
    live.mkdir()
    assert ag.build_toy_world(str(folder)) == (str(folder / "reasoner"), str(folder / "renderer"))
    assert not stale.exists() and live.exists()


def test_plan_accuracy_by_hand():
    green_bottom, red_top = {"colour": "green", "region": "bottom"}, {"colour": "red", "region": "top"}
    assert ag.plan_names_target("green bottom", green_bottom)
    assert ag.plan_names_target("Green, bottom.", green_bottom)
    assert not ag.plan_names_target("green red bottom", green_bottom)  # two colours: not a plan for the target
    assert not ag.plan_names_target("green top", green_bottom) and not ag.plan_names_target("bottom", green_bottom)
    assert ag.plan_accuracy(["green bottom", "green bottom", "whatever"], [green_bottom, red_top, None]) == 0.5
    assert ag.plan_accuracy(["green bottom"], [None]) is None


@pytest.mark.parametrize("frozen", ["reasoner", "renderer"])
def test_a_frozen_side_does_not_move(toy_dirs, frozen):
    """--no-train-reasoner / --no-train-renderer: the frozen side's LoRA is bit-identical after an update, the
    other side's moves (the same shared advantage drives it)."""
    policy, args = make_policy(toy_dirs, group_size=4, groups_per_step=1, updates_per_rollout=1,
                               **{f"train_{frozen}": False})
    randomize_lora(policy)
    g = rollout(policy, args, seed=3)
    g.index = 0  # the step's only group: update draws its shares over group indices 0..groups_per_step-1
    assert g.advantages.abs().sum() > 0
    sides = {"reasoner": policy.reasoner.lora_params, "renderer": policy.renderer.lora_params}
    before = {k: [p.detach().clone() for p in v] for k, v in sides.items()}
    ag.update(policy, ag.make_optimizer(policy, args), [g], args, random.Random(0))
    moved = {k: any(not torch.equal(a, b) for a, b in zip(before[k], sides[k])) for k in sides}
    assert moved == {"reasoner": frozen != "reasoner", "renderer": frozen != "renderer"}


def test_curves_png_draws_the_series(tmp_path):
    rows = [{"step": s, "reward_mean": 0.2 + 0.02 * s, "eval_reward": 0.3 if s % 5 == 0 else None,
             "plan_accuracy": None, "text_clipfrac": 0.01, "image_clipfrac": 0.2} for s in range(10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ag.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    im = Image.open(tmp_path / "curves.png").convert("RGB")
    assert im.size == (720, 480)
    colours = {c for _, c in im.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # reward_mean and eval_reward are drawn
    assert (44, 160, 44) not in colours  # plan_accuracy is all null: left out


# --------------------------------------------------------------------------------------------------
# Fidelity: the objective, the samplers against the stock pipelines, the scorers' commands (issue 24)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["rt2i", "srr"])
def test_lambda_follows_the_task(klein_dirs, task):
    """lambda as the official configs weigh the image term: RT2I L_text + 1 * L_img (text_loss_weight 1), SRR
    L_text + W * L_img, i.e. the sum over the W trained steps (text_loss_weight 1 / K). At the first update
    (ratios 1) L_img = -mean(A) and L_text = -sum_i A_i L_i / sum_i L_i, computed here by hand."""
    policy, args = make_policy(klein_dirs, group_size=4, sde_window=2)
    g = rollout(policy, args, task=task)
    g.advantages = torch.tensor([1.0, 0.5, -0.25, 0.25])  # mean 0.375: L_img is not 0
    lengths = g.text.mask.sum(1).float()
    text = -float((g.advantages * lengths).sum() / lengths.sum())
    W = g.image.latents.shape[1] - 1
    assert W == 2
    loss, stats = ag.group_loss(policy, g, args)
    assert math.isclose(stats["image_loss"], -0.375, rel_tol=1e-5)
    assert math.isclose(stats["text_loss"], text, rel_tol=1e-5)
    lam = {"rt2i": 1.0, "srr": W}[task]
    assert math.isclose(loss.item(), text + lam * -0.375, rel_tol=1e-5)
    assert "lam" not in ag.PRESETS["klein"] and "lam" not in ag.PRESETS["sd35"]  # the presets follow the task too


def test_update_averages_the_groups_losses(toy_dirs):
    """The update's gradient is the mean of the groups' gradients (Adam would hide a sum; gradient clipping and
    plain SGD do not): one SGD step with lr 1 moves the weights by minus that mean, computed group by group."""
    policy, args = make_policy(toy_dirs, group_size=4, groups_per_step=2, updates_per_rollout=1, grad_clip=1e9)
    randomize_lora(policy)
    groups = [rollout(policy, args, seed=s) for s in (1, 2)]
    for k, g in enumerate(groups):
        g.index = k
    params = policy.reasoner.lora_params + policy.renderer.lora_params
    grads = []
    for g in groups:
        loss, _ = ag.group_loss(policy, g, args)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    mean = [sum(x if x is not None else torch.zeros_like(p) for x in gs) / 2 for p, gs in zip(params, zip(*grads))]
    before = [p.detach().clone() for p in params]
    ag.update(policy, torch.optim.SGD(params, lr=1.0), groups, args, random.Random(0))
    assert any(m.abs().max() > 1e-6 for m in mean)
    for p, b, m in zip(params, before, mean):
        torch.testing.assert_close(p.detach(), b - m, atol=1e-6, rtol=1e-5)


def test_srr_initial_images_use_the_refinements_sampler(klein_dirs):
    """SRR's initial candidates come from the ODE sampler at the refinements' step count (--num-steps), as the
    official code draws both, not at --eval-num-steps: equal to Flux2KleinPipeline at that count
    (--srr-init-steps chooses another)."""
    for init_steps, expected_steps in ((0, 4), (6, 6)):
        policy, args = make_policy(klein_dirs, num_steps=4, eval_num_steps=8, srr_candidates=2,
                                   srr_init_steps=init_steps)
        r = policy.renderer
        images, _ = ag.initial_candidates(policy, TOY_PROMPTS[0], args, torch.Generator().manual_seed(5),
                                          LocalClient())
        x_T = r.noise(2, torch.Generator().manual_seed(5))
        stock = r.decode(klein_stock(r, r.encode([TOY_PROMPTS[0]["prompt"]] * 2), x_T, expected_steps, 1.0))
        assert [im.tobytes() for im in images] == [im.tobytes() for im in stock], init_steps


def count_transformer_batches(transformer):
    """Record the batch size of every transformer call."""
    sizes = []
    handle = transformer.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("which", ["klein", "sd3"])
def test_guidance_one_means_no_guidance(which, klein_dirs, toy_dirs):
    """As the pipelines decide it: at --guidance-scale 1 (and below) CFG is off, so the transformer sees a batch of
    G, not 2G, in the rollout and in the loss, and the ODE images are bit-identical to the stock pipeline's (which
    below 1 does not extrapolate either)."""
    dirs = klein_dirs if which == "klein" else toy_dirs
    for scale in (1.0, 0.5):
        policy, args = make_policy(dirs, group_size=4, guidance_scale=scale)
        randomize_lora(policy)
        r = policy.renderer
        sizes, handle = count_transformer_batches(r.transformer)
        g = rollout(policy, args)
        ag.group_loss(policy, g, args)
        handle.remove()
        assert sizes and set(sizes) == {4}, sizes
        x_T = r.noise(2, torch.Generator().manual_seed(0))
        cond = r.encode(["the bottom half is green"] * 2)
        ours = ag.render(r, cond, x_T, r.sigmas(args.num_steps), range(0), 0.0)[0]
        assert torch.equal(ours, ag.stock_pipeline(r, cond, x_T, args.num_steps)), scale
    policy, args = make_policy(dirs, group_size=4, guidance_scale=2.0)  # above 1: the doubled batch
    sizes, handle = count_transformer_batches(policy.renderer.transformer)
    rollout(policy, args)
    handle.remove()
    assert set(sizes) == {8}


def test_klein_refine_is_the_pipelines_edit_at_the_sources_aspect_ratio(klein_dirs):
    """An in-context refinement (SRR, GEdit-Bench's edit) is Flux2KleinPipeline(image=source): fresh noise (not the
    source's latents), the source encoded at its own aspect ratio and size (a 128x64 source: 8x4 = 32 reference
    tokens, as the pipeline's image=), and the edit drawn at that aspect ratio (a scorer resizes it to the source)."""
    policy, args = make_policy(klein_dirs, resolution=64, eval_num_steps=4, guidance_scale=3.0)
    randomize_lora(policy)
    r = policy.renderer
    rng = torch.Generator().manual_seed(0)
    source = Image.fromarray((torch.rand(64, 128, 3, generator=rng) * 255).byte().numpy())  # 128 wide, 64 high
    prompt = "make the bottom half green"
    ours, _ = ag.refine(policy, args, prompt, source, torch.Generator().manual_seed(3), reasoning=False)
    H, W = r.edit_size(source)
    assert (H, W) == (48, 96) and ours.size == (96, 48)  # 2:1 at about 64^2 pixels
    reference = r.encode_image(source)
    assert reference.shape[-2:] == (4, 8)  # 32 reference tokens, at the source's own size
    x_T = r.noise(1, torch.Generator().manual_seed(3), (H, W))
    cond = r.encode([prompt])
    out = r.pipe(latents=x_T, prompt_embeds=cond[0][1:], negative_prompt_embeds=cond[0][:1], image=[source],
                 num_inference_steps=4, guidance_scale=3.0, height=H, width=W, output_type="latent",
                 max_sequence_length=args.max_text_tokens, text_encoder_out_layers=r.text_layers).images
    stock = r.decode((r.pipe._patchify_latents(out) - r.bn_mean) / r.bn_std)[0]
    diff = np.abs(np.asarray(ours, dtype=np.int32) - np.asarray(stock, dtype=np.int32)).max()
    assert stock.size == ours.size and int(diff) <= 1, int(diff)  # measured: 0 (CFG batched vs. two calls)


def test_klein_encode_reads_the_pipelines_hidden_layers():
    """KleinRenderer.encode is Flux2KleinPipeline.encode_prompt with its defaults: a 36-layer Qwen3 (klein's depth,
    tiny width) read at layers (9, 18, 27), the same tokens and positions."""
    shapes = {**ag.SHAPES["toy"], "qwen3": {**ag.SHAPES["toy"]["qwen3"], "num_hidden_layers": 36}}
    pipe = ag.make_klein(shapes)
    r = ag.KleinRenderer(pipe, torch.device("cpu"), ag.Args())
    texts = ["the bottom half is green", "a red top half"]
    emb, ids, _, _ = r.encode(texts)
    theirs, their_ids = pipe.encode_prompt(prompt=texts, device=torch.device("cpu"),
                                           max_sequence_length=r.args.max_text_tokens)
    assert r.text_layers == (9, 18, 27)
    assert torch.equal(emb[2:], theirs) and torch.equal(ids, their_ids[0])
    blank, _ = pipe.encode_prompt(prompt=["", ""], device=torch.device("cpu"),
                                  max_sequence_length=r.args.max_text_tokens)
    assert torch.equal(emb[:2], blank)  # the negative half is the empty prompt's


def test_klein_bf16_sampler_is_the_pipelines(klein_dirs):
    """In bf16 the transformer gets the pipeline's very inputs at every step (the timestep rounded to bf16 before
    / 1000, as the pipeline does); the latents differ only because the pipeline rounds them to bf16 after each
    step where ours stay fp32 (README): measured max 0.022 on latents of scale 4.4; an unrounded timestep gave
    0.071."""
    policy, args = make_policy(klein_dirs, resolution=64, num_steps=5, dtype="bfloat16")
    randomize_lora(policy)
    r = policy.renderer
    x_T = r.noise(2, torch.Generator().manual_seed(0)).bfloat16().float()  # the pipeline starts from bf16 latents
    cond = r.encode(["the bottom half is green"] * 2)
    seen = []
    handle = r.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                     with_kwargs=True)
    ours = ag.render(r, cond, x_T, r.sigmas(5), range(0), 0.0)[0]
    ours_t = seen[:]
    seen.clear()
    theirs = klein_stock(r, cond, x_T, 5, 1.0)
    handle.remove()
    assert len(ours_t) == len(seen) == 5 and all(a.dtype == torch.bfloat16 for a in ours_t)
    assert all(torch.equal(a, b) for a, b in zip(ours_t, seen))
    assert ours.abs().max() > 1 and (ours - theirs).abs().max() < 0.04


def test_memory_plan_counts_what_runs(klein_dirs):
    """The plan doubles klein's image tokens only where SRR refines in context, and counts CFG only where it runs
    (guidance above 1 on a model that is not step-distilled)."""
    policy, _ = make_policy(klein_dirs)
    parts = {"reasoner": policy.reasoner.model, "renderer.transformer": policy.renderer.transformer}

    def activations(distilled=False, **kw):
        args = ag.Args(resolution=64, max_text_tokens=0, **kw)
        policy.renderer.args, policy.renderer.distilled = args, distilled
        guided = policy.renderer.guided(None)
        return next(gb for name, _, gb in ag.memory_plan(parts, args, guided) if "renderer activations" in name)

    base = activations(task="rt2i", guidance_scale=4.0)
    assert math.isclose(activations(task="srr", guidance_scale=4.0, srr_refine="edit"), 2 * base)
    assert math.isclose(activations(task="srr", guidance_scale=4.0, srr_refine="sdedit"), base)
    assert math.isclose(activations(task="rt2i", guidance_scale=1.0), base / 2)
    assert math.isclose(activations(task="rt2i", guidance_scale=0.5), base / 2)  # klein guides above 1 only
    assert math.isclose(activations(task="rt2i", guidance_scale=4.0, distilled=True), base / 2)


def test_scorer_commands_fit_the_drawn_set(tmp_path, monkeypatch):
    """TIIF-Bench's questions are the drawn set's (test or testmini: the same file names, other prompts); WISE's
    command is the drawn release's only; every tree is an absolute path, also from a relative --out (WISE's and
    GEdit-Bench's scripts change directory first); DPG-Bench's launches one process per GPU."""
    tiif = bench_data(tmp_path / "a", "tiif")
    mini = tmp_path / "a" / "testmini_prompts"
    tiif.rename(mini)
    cmd = lambda b, d: ag.scorer_commands(b, str(d), ["out/round_0"], 1, 32)[0]["round_0"]
    assert "--jsonl_dir data/testmini_eval_prompts " in cmd("tiif", mini)[0]
    assert "--jsonl_dir data/testmini_eval_prompts " in cmd("tiif", next(mini.iterdir()))[0]  # one file of the set
    mini.rename(tiif)
    assert "--jsonl_dir data/test_eval_prompts " in cmd("tiif", tiif)[0]
    other = tmp_path / "a" / "my_copy"
    tiif.rename(other)
    assert "--jsonl_dir <EVAL_PROMPTS_OF_THE_SET_DRAWN> " in cmd("tiif", other)[0]  # fails loudly when run
    wise = bench_data(tmp_path / "b", "wise")
    verified = cmd("wise", wise)
    assert len(verified) == 1 and "eval_qwen.sh" in verified[0] and "gpt_eval" not in verified[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (wise / "cultural_common_sense_verified.json").rename(legacy / "cultural_common_sense.json")
    commands = cmd("wise", legacy)
    assert len(commands) == 1 and "gpt_eval.py" in commands[0] and "eval_qwen" not in commands[0]
    (legacy / "cultural_common_sense.json").rename(wise / "cultural_common_sense.json")  # both releases: refused
    with pytest.raises(ValueError, match="both releases"):
        cmd("wise", wise)
    dpg = cmd("dpg", bench_data(tmp_path / "c", "dpg"))[0]
    assert dpg.startswith("PROCESSES=$(nvidia-smi -L | wc -l) PIC_NUM=1 bash dpg_bench/dist_eval.sh ")
    monkeypatch.chdir(tmp_path)
    for benchmark in ag.BENCHMARKS:
        data = {"wise": tmp_path / "b" / "data"}.get(benchmark) or bench_data(tmp_path / benchmark, benchmark)
        if benchmark == "wise":
            (wise / "cultural_common_sense.json").unlink()
        for c in ag.scorer_commands(benchmark, str(data), ["out/round_0"], 1, 32)[0]["round_0"]:
            assert str(tmp_path / "out" / "round_0") in c and " out/round_0" not in c, c


def test_sample_and_eval_build_the_toy_world_on_an_empty_cache(tmp_path, monkeypatch):
    """A fresh machine: `sample` and `eval` (which draw under no_grad) build the toy world's priors themselves.
    A smaller build (TOY_BUILD is part of the cache key) keeps this quick; the code path is the default one."""
    monkeypatch.setattr(ag, "TOY_BUILD", {**ag.TOY_BUILD, "reasoner_steps": 3, "reasoner_warmup": 1,
                                          "vae_steps": 3, "renderer_steps": 3})
    cache = tmp_path / "cache"
    ag.main(["sample", "--prompt", "a calm sea below", "--toy-cache", str(cache), "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "round_0.png").exists()
    built = [d for d in os.listdir(cache) if d.startswith("toy-")]
    assert len(built) == 1 and (cache / built[0] / "build.json").exists()
    data = bench_data(tmp_path / "data", "wise")
    ag.main(["eval", "--benchmark", "wise", "--data", str(data), "--limit", "1", "--toy-cache",
             str(tmp_path / "cache2"), "--out", str(tmp_path / "e")])
    assert (tmp_path / "e" / "round_0" / "1.png").exists() and os.listdir(tmp_path / "cache2")


def test_the_run_ends_with_a_summary(tmp_path):
    """The console's last words: the first and last 10 steps' means and the first and last evaluation, not the
    last step's one noisy batch."""
    rows = [{"step": s, "reward_mean": 0.1 if s < 10 else 0.6 if s >= 20 else 0.3, "plan_accuracy_implicit": None,
             "eval_reward": {0: 0.4, 29: 0.7}.get(s), "eval_plan_accuracy": None} for s in range(30)]
    rows[-1]["reward_mean"] = 0.15  # a bad last batch
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = ag.run_summary(str(tmp_path))
    assert "reward_mean" in text and "0.100 -> 0.555" in text  # (9 * 0.6 + 0.15) / 10
    assert "after 0 -> 29 updates" in text and "eval_reward" in text and "0.400 -> 0.700" in text
    assert "plan_accuracy" not in text and "curves.png" in text


def test_grids_show_each_rows_prompt(tmp_path):
    """A grid reads alone: each row's prompt is written above it (dark blue text in the title band)."""
    tile = (Image.new("RGB", (32, 32), (0, 200, 0)), "R 1.00", "green bottom")
    ag.save_grid(str(tmp_path / "g.png"), [("first prompt", [tile] * 3), ("second prompt", [tile] * 3)], cols=3)
    im = Image.open(tmp_path / "g.png").convert("RGB")
    cell, band = 128, 36
    assert im.size == (3 * cell, 2 * (cell + 2 * band))
    for row in range(2):
        y0 = row * (cell + 2 * band)
        title = [im.getpixel((x, y)) for x in range(0, 3 * cell) for y in range(y0, y0 + band)]
        ink = [(r, g, b) for r, g, b in title if (r, g, b) != (255, 255, 255)]
        assert len(ink) > 50 and all(b >= r and b >= g for r, g, b in ink)  # the title's blue letters
    ag.save_grid(str(tmp_path / "untitled.png"), [("", [tile] * 3)], cols=3)
    untitled = Image.open(tmp_path / "untitled.png").convert("RGB")
    assert untitled.crop((0, 0, 3 * cell, band)).getcolors() == [(3 * cell * band, (255, 255, 255))]
    # the evaluation's one-image rows share a line
    ag.save_grid(str(tmp_path / "e.png"), [(f"prompt {k}", [tile]) for k in range(5)], cols=4)
    assert Image.open(tmp_path / "e.png").size == (4 * cell, 2 * (cell + 2 * band))


# --------------------------------------------------------------------------------------------------
# The unified policy: one Cosmos3 network reasons (transformers) and draws (diffusers)
# --------------------------------------------------------------------------------------------------


# Args a toy reasoner needs beyond the defaults, by its path (the Edge one: its LoRA targets)
EXTRA_ARGS = {}


@pytest.fixture(scope="session", params=["nano", "edge"])
def cosmos_dirs(request, tmp_path_factory):
    """The unified toy: a tiny Cosmos3 whose understanding stream is a Qwen3-VL (Nano's form) or a Nemotron
    with a relu2 MLP and no text q/k norm (Edge's form); every unified test runs on both."""
    root = tmp_path_factory.mktemp("cosmos3-" + request.param)
    if request.param == "edge":
        reasoner = ag.build_toy_edge(str(root / "reasoner"))
        EXTRA_ARGS[reasoner] = {"reasoner_lora_targets": ag.EDGE_REASONER_LORA_TARGETS}
    else:
        reasoner = ag.build_toy_vlm(str(root / "reasoner"), cosmos=True)
    return reasoner, ag.build_toy_cosmos3(str(root / "renderer"), reasoner)


GENERATION_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added", "moe_gen", "proj_in.",
                     "proj_out.", "time_embedder", "k_norm_und_for_gen")


def understanding_logits(transformer, ids):
    """Text logits through the diffusers transformer's own decoder stack (its understanding path, no generation
    tokens) and lm_head: text positions are the same on the three rotary axes."""
    h = transformer.embed_tokens(ids)
    pos = torch.arange(len(ids), dtype=torch.float32)[None].expand(3, -1)
    cos, sin = (t.squeeze(0) for t in transformer.rotary_emb(pos[:, None], ids.device, h.dtype))
    for layer in transformer.layers:
        h, _ = layer(h, h[:0], (cos, sin, cos[:0], sin[:0]))
    return transformer.lm_head(transformer.norm(h))


def test_unified_policy_is_one_network(cosmos_dirs):
    """Every understanding-stream parameter of the diffusers transformer is the reasoner's own tensor (one
    storage: the weights exist once), the generation stream's are its own, and with non-zero LoRA the text
    logits through the transformer's decoder stack equal the reasoner's exactly."""
    policy, args = make_policy(cosmos_dirs, policy="unified")
    randomize_lora(policy)
    model, tr = policy.reasoner.model, policy.renderer.transformer
    edge = cosmos_dirs[0] in EXTRA_ARGS
    assert type(model).__name__ == ("Cosmos3EdgeForConditionalGeneration" if edge else
                                    "Cosmos3OmniForConditionalGeneration")
    mine = {p.data_ptr() for p in model.parameters()}
    for n, p in tr.named_parameters():
        assert (p.data_ptr() in mine) == (not any(s in n for s in GENERATION_STREAM)), n
    total = len({p.data_ptr() for p in [*model.parameters(), *tr.parameters()]})
    assert total == len(list(model.parameters())) + sum(1 for n, _ in tr.named_parameters()
                                                         if any(s in n for s in GENERATION_STREAM))
    ids = torch.tensor(policy.reasoner.processor.tokenizer("the bottom half is green")["input_ids"])
    with torch.no_grad():
        ours = understanding_logits(tr, ids)
        theirs = model(input_ids=ids[None]).logits[0]
        assert torch.equal(ours, theirs)
        with ag.lora_disabled(model):  # the LoRA is in both: switched off in one, off in the other
            assert not torch.allclose(understanding_logits(tr, ids), ours)


def test_unified_lora_learns_from_both_halves(cosmos_dirs):
    """The shared LoRA gets gradients from the text's log-probs; from the image's velocity only through a context
    recomputed with gradient (--context-grad), never through the rollout's cached one (the official code's
    semantics, the default); the generation stream's LoRA from the velocity alone, the same gradient either way.
    One optimizer step on the text loss moves the velocity of a context encoded after it."""
    policy, args = make_policy(cosmos_dirs, policy="unified", group_size=2)
    randomize_lora(policy)
    shared, gen = policy.reasoner.lora_params, policy.renderer.lora_params
    assert not {id(p) for p in shared} & {id(p) for p in gen}
    assert all(p.requires_grad for p in shared + gen)  # as load_policy leaves them, before make_optimizer
    named = {n: p for n, p in policy.reasoner.model.named_parameters() if ".lora_B" in n}
    # the image reads the text through every layer's keys and values, and layer 0's output feeds layer 1's
    feeds_image = [p for n, p in named.items() if "k_proj" in n or "v_proj" in n or ".layers.0." in n]
    g = rollout(policy, args)
    r = policy.renderer
    x, cond = r.noise(2, torch.Generator().manual_seed(3)), r.encode(["the bottom half is green"] * 2)
    opt = ag.make_optimizer(policy, args)
    gen_grads = {}
    for half in ("text", "image", "image with context grad"):
        opt.zero_grad(set_to_none=True)
        if half == "text":
            (-(policy.reasoner.token_logprobs(g.text) * g.text.mask).sum()).backward()
        else:
            c = r.fresh(cond, grad=True) if half == "image with context grad" else cond
            r.velocity(x, 0.8, c).square().sum().backward()
            gen_grads[half] = [p.grad.clone() for p in gen]
        if half == "image":
            assert all(p.grad is None for p in named.values())
        else:
            reached = named.values() if half == "text" else feeds_image
            # layer 0's LoRA (7 targets in Nano's form, 6 in Edge's) and the next layer's k and v
            assert len(reached) >= 8 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in reached)
        assert all(p.grad is None for p in gen) == (half == "text")
        assert half == "text" or all(p.grad.abs().sum() > 0 for p in gen if p.shape[1] == args.lora_rank)
    for a, b in zip(*gen_grads.values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        v_before = r.velocity(x, 0.8, cond)
    opt.zero_grad(set_to_none=True)
    (-(policy.reasoner.token_logprobs(g.text) * g.text.mask).sum()).backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(r.velocity(x, 0.8, cond), v_before)  # the cache is the rollout's
        assert (r.velocity(x, 0.8, r.fresh(cond)) - v_before).abs().max() > 1e-6


def stock_velocity(renderer, transformer, texts, x, sigma, guidance, reference=None):
    """The stock Cosmos3OmniTransformer's full call, one packed sample at a time (text, [the clean reference,]
    the noisy image, as the pipeline packs them: its own helpers and its own attention processor), with CFG over
    the negative prompt where guidance is not 1: (B, C, h, w)."""
    p = renderer.pipe
    B, C, h, w = x.shape
    t = int(float(sigma) * 1000)
    out = []
    for i in range(B):
        v = []
        for negative in (True, False) if guidance != 1 else (False,):
            ids = p.tokenize_prompt(texts[i], None, num_frames=1, height=h * renderer.scale,
                                    width=w * renderer.scale)[1 if negative else 0]
            seg = p._prepare_text_segment(ids, device="cpu")
            offset, curr = seg["vision_start_temporal_offset"], seg["und_len"]
            items = ([reference] if reference is not None else []) + [x[i:i + 1]]
            positions, shapes, seq, mse, noisy = [seg["text_mrope_ids"]], [], [], [], []
            for item in items:
                clean = item is reference
                vis = p._prepare_vision_segment(item[:, :, None], clean, offset, None, curr, "cpu",
                                                condition_frame_indexes=[0] if clean else [])
                positions.append(vis["vision_mrope_ids"])
                shapes += vis["vision_token_shapes"]
                seq.append(vis["vision_sequence_indexes"])
                mse.append(vis["vision_mse_loss_indexes"])
                noisy += vis["vision_noisy_frame_indexes"]
                offset = math.ceil(vis["vision_mrope_ids"].max().item()) + 1
                curr += vis["num_vision_tokens"]
            preds = transformer(input_ids=seg["input_ids"], text_indexes=seg["text_indexes"], und_len=seg["und_len"],
                                position_ids=torch.cat(positions, 1), sequence_length=curr,
                                vision_tokens=[item[:, :, None] for item in items], vision_token_shapes=shapes,
                                vision_sequence_indexes=torch.cat(seq), vision_mse_loss_indexes=torch.cat(mse),
                                vision_noisy_frame_indexes=noisy,
                                vision_timesteps=torch.full((vis["num_noisy_vision_tokens"],), t),
                                return_dict=False)[0]
            v.append(preds[-1][0, :, 0].float())
        out.append(v[0] + guidance * (v[1] - v[0]) if len(v) == 2 else v[0])
    return torch.stack(out)


@pytest.mark.parametrize("guidance,with_reference", [(1.0, False), (1.0, True), (3.0, False), (3.0, True)])
def test_unified_cached_velocity_equals_the_stock_forward(cosmos_dirs, guidance, with_reference):
    """Our velocity (the context cached once per sample, the group's generation tokens in one batched pass) equals
    the stock Cosmos3OmniTransformer's full call on each packed sample to fp32 rounding: texts of different
    lengths (padded context), with and without SRR's clean reference item, at guidance 1 and above, with
    non-zero LoRA in both streams."""
    policy, args = make_policy(cosmos_dirs, policy="unified", guidance_scale=guidance)
    randomize_lora(policy)
    r = policy.renderer
    sigma = float(r.sigmas(4)[1])
    x = r.noise(3, torch.Generator().manual_seed(1))
    texts = ["the bottom half is green", "a red top. red top", "sky"]
    reference = r.encode_image(Image.new("RGB", (32, 32), (255, 0, 0))) if with_reference else None
    with torch.no_grad():
        cond = r.encode(texts, reference=reference)
        ours = r.velocity(x, sigma, cond)
        theirs = stock_velocity(r, r.transformer, texts, x, sigma, guidance, reference)
    assert len(set(cond[3].mask.sum(1).tolist())) > 1 and theirs.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_unified_group_is_one_pass_and_samples_are_isolated(cosmos_dirs):
    """One transformer pass per denoising step for the whole group and its CFG branch (one call of each decoder
    layer, 2G rows); the context runs once per sample. Changing sample j's reasoning (same token count) or its noise
    leaves sample i's velocity bit-identical: attention keeps each sample to its own context and tokens."""
    policy, args = make_policy(cosmos_dirs, policy="unified", guidance_scale=2.0)
    r = policy.renderer
    calls = []
    hook = r.transformer.layers[0].register_forward_hook(lambda m, a, out: calls.append(out[1].shape[0]))
    texts = ["the bottom half is green", "a red top half", "sky is blue above"]
    x = r.noise(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = r.encode(texts)
        assert len(calls) == 4  # the understanding stream: each text once, the shared negative once
        calls.clear()
        v = r.velocity(x, 0.8, cond)
        assert calls == [6]  # one batched pass: 3 samples x [negative; positive]
        other = r.encode([texts[0], "a blue top half", texts[2]])  # sample 1's text, same length
        assert torch.equal(other[3].mask, cond[3].mask)
        v_text = r.velocity(x, 0.8, other)
        x2 = x.clone()
        x2[1] = torch.randn(x2[1].shape, generator=torch.Generator().manual_seed(9))
        v_noise = r.velocity(x2, 0.8, cond)
    hook.remove()
    for changed in (v_text, v_noise):
        assert torch.equal(changed[0], v[0]) and torch.equal(changed[2], v[2])
        assert not torch.allclose(changed[1], v[1])


def stock_cosmos(renderer, prompt, x_T, steps, guidance):
    """Cosmos3OmniPipeline itself, text-to-image, from the same latents, with its UniPC scheduler at first order
    without the corrector (an Euler step); returns its latents (C, h, w) and the kwargs of its transformer calls."""
    from diffusers import UniPCMultistepScheduler

    pipe = renderer.pipe
    kept = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(kept.config, solver_order=1,
                                                         disable_corrector=list(range(steps)))
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    res = renderer.args.resolution
    try:
        out = pipe(prompt, num_frames=1, height=res, width=res, num_inference_steps=steps, guidance_scale=guidance,
                   latents=x_T[None, :, None], output_type="latent").video
    finally:
        hook.remove()
        pipe.scheduler = kept
    return out.reshape(x_T.shape), calls


@pytest.mark.parametrize("guidance", [3.0, 1.0, 0.5])
def test_unified_sampler_equals_the_cosmos3_pipeline(cosmos_dirs, guidance):
    """Our ODE sampler (noise 0) on a group of 2 is Cosmos3OmniPipeline's text-to-image on each prompt (schedule,
    integer timesteps, CFG; one frame), and CFG runs where the pipeline runs it: at any scale other than 1."""
    policy, args = make_policy(cosmos_dirs, policy="unified", num_steps=4, guidance_scale=guidance)
    randomize_lora(policy)
    r = policy.renderer
    assert r.guided(None) == (guidance != 1)
    x_T = r.noise(2, torch.Generator().manual_seed(0))
    prompts = ["the bottom half is green", "a red top"]
    with torch.no_grad():
        ours = ag.render(r, r.encode(prompts), x_T, r.sigmas(4), range(0), 0.0)[0]
    for i, prompt in enumerate(prompts):
        theirs, calls = stock_cosmos(r, prompt, x_T[i], 4, guidance)
        assert len(calls) == (8 if guidance != 1 else 4)
        assert ours[i].abs().max() > 0.1
        torch.testing.assert_close(ours[i], theirs, atol=1e-5, rtol=1e-5)


def test_unified_refinement_sees_the_initial_image(cosmos_dirs):
    """SRR in context: the initial image is a clean vision item among the generation tokens (no timestep
    embedding, no prediction, recomputed at every step: generation attention is bidirectional), and the noisy
    item's velocity depends on it, with gradients reaching the generation stream; the reference is never trained."""
    policy, args = make_policy(cosmos_dirs, policy="unified")
    r = policy.renderer
    x = r.noise(2, torch.Generator().manual_seed(0))
    refs = [r.encode_image(Image.new("RGB", (32, 32), c)) for c in ((255, 0, 0), (0, 0, 255))]
    ag.make_optimizer(policy, args)
    conds = [r.encode(["fix the colour"] * 2, reference=ref) for ref in refs]
    v = [r.velocity(x, 0.8, c) for c in conds]
    with torch.no_grad():
        v_none = r.velocity(x, 0.8, r.encode(["fix the colour"] * 2))
    assert (v[0] - v[1]).abs().max() > 1e-5 and (v[0] - v_none).abs().max() > 1e-5
    (v[0] - v[1]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.lora_params if p.shape[1] == args.lora_rank)
    assert not refs[0].requires_grad and not conds[0][1].requires_grad  # the initial image is context
    positions = conds[0][3].positions  # (3, B, 8): the reference's 4 tokens, then the noisy image's 4
    assert positions.shape == (3, 2, 8)
    assert positions[0, 0, 4:].min() > positions[0, 0, :4].max()  # the noisy item after the reference


@pytest.mark.parametrize("task,temperature,context_grad", [("rt2i", 0.7, False), ("srr", 0.7, False),
                                                           ("srr", 1.0, False), ("rt2i", 0.7, True),
                                                           ("srr", 0.7, True)])
def test_unified_first_update_ratio_is_exactly_one(cosmos_dirs, task, temperature, context_grad):
    """RT2I and SRR (in context), at a temperature other than 1, with the rollout's cached context and with
    --context-grad's recomputed one: the first update's text and image log-probs are the stored ones, with
    non-zero LoRA on both streams."""
    policy, args = make_policy(cosmos_dirs, policy="unified", group_size=3, temperature=temperature,
                               context_grad=context_grad)
    randomize_lora(policy)
    g = rollout(policy, args, task=task)
    assert (g.image.cond[1] is not None) == (task == "srr")
    with torch.no_grad():
        text, image = current_logps(policy, g, args)
    assert torch.equal(text * g.text.mask, g.text.old_logp * g.text.mask)
    assert torch.equal(image, g.image.old_logp)
    ag.make_optimizer(policy, args)
    loss, stats = ag.group_loss(policy, g, args)
    assert stats["text_clipfrac"] == 0 and stats["image_clipfrac"] == 0
    loss.backward()
    assert all(p.grad is not None for p in policy.reasoner.lora_params + policy.renderer.lora_params)
    with torch.no_grad(), ag.lora_disabled(policy.renderer.transformer):  # the shared LoRA is in the reasoner
        assert not torch.allclose(policy.reasoner.token_logprobs(g.text) * g.text.mask, g.text.old_logp * g.text.mask)


def test_unified_image_loss_reaches_the_shared_stream_only_with_context_grad(cosmos_dirs):
    """The image loss alone (--lam 1, text loss zeroed by a zero text mask): its gradient reaches the shared
    stream's LoRA with --context-grad and not without; the generation stream's gradient is the same either way."""
    grads = {}
    for context_grad in (False, True):
        policy, args = make_policy(cosmos_dirs, policy="unified", group_size=3, context_grad=context_grad)
        randomize_lora(policy)
        g = rollout(policy, args)
        g.advantages = torch.tensor([1.0, -0.5, -0.5])
        g.text.mask = torch.zeros_like(g.text.mask)
        ag.make_optimizer(policy, args)
        ag.group_loss(policy, g, args)[0].backward()
        grads[context_grad] = ([p.grad for p in policy.reasoner.lora_params],
                               [p.grad.clone() for p in policy.renderer.lora_params])
    assert all(p is None or p.abs().sum() == 0 for p in grads[False][0])
    assert sum(p.abs().sum() for p in grads[True][0] if p is not None) > 0
    for a, b in zip(grads[False][1], grads[True][1]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_unified_lora_export_loads_in_both_classes_and_merges(cosmos_dirs, tmp_path):
    """The renderer export names every LoRA module of the diffusers transformer (shared stream under its diffusers
    names, generation stream), the reasoner's PEFT adapter the same shared weights under transformers' names;
    merged by hand into fresh copies of both stock classes, each reproduces our outputs."""
    from diffusers import Cosmos3OmniTransformer
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    policy, args = make_policy(cosmos_dirs, policy="unified", lora_rank=4, lora_alpha=12.0)
    randomize_lora(policy, scale=0.2)
    ag.export_lora(policy, args, str(tmp_path))
    sd = load_file(str(tmp_path / "renderer" / "pytorch_lora_weights.safetensors"))
    base = Cosmos3OmniTransformer.from_pretrained(cosmos_dirs[1], subfolder="transformer")
    wrapped = {n for n, m in policy.renderer.transformer.named_modules() if isinstance(m, ag.LoRALinear)}
    assert {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd} == wrapped
    assert "layers.0.self_attn.to_q" in wrapped and "layers.0.self_attn.add_q_proj" in wrapped
    merge_exported_lora(sd, dict(base.named_modules()), rank=4)
    r = policy.renderer
    x = r.noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = r.velocity(x, 0.7, r.encode(["a red top"]))
        merged = stock_velocity(r, base, ["a red top"], x, 0.7, 1.0)  # the stock class, its own processor
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)
    adapter = load_file(str(tmp_path / "reasoner" / "adapter_model.safetensors"))
    stock = AutoModelForImageTextToText.from_pretrained(cosmos_dirs[0])
    modules = dict(stock.named_modules())
    scale = args.lora_alpha / args.lora_rank
    with torch.no_grad():
        for k, a in adapter.items():
            if k.endswith("lora_A.weight"):
                name = k[len("base_model.model."):-len(".lora_A.weight")]
                modules[name].weight += scale * adapter[k.replace("lora_A", "lora_B")] @ a
        ids = torch.tensor([[3, 5, 7, 9]])
        torch.testing.assert_close(stock(input_ids=ids).logits, policy.reasoner.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_unified_checks_come_before_any_model_loads(cosmos_dirs, toy_dirs, klein_dirs, tmp_path, monkeypatch):
    """--policy that does not fit the renderer, and a reasoner that is not the generator's understanding stream,
    stop with a clear error before a model loads."""
    monkeypatch.setattr(ag, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the checks"))
    with pytest.raises(SystemExit, match="--policy decoupled with a cosmos3 renderer"):
        ag.main(["--reasoner", cosmos_dirs[0], "--renderer", cosmos_dirs[1], "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--policy unified with a klein renderer"):
        ag.main(["--policy", "unified", "--reasoner", klein_dirs[0], "--renderer", klein_dirs[1],
                 "--out", str(tmp_path / "b")])
    bigger = ag.build_toy_vlm(str(tmp_path / "bigger"), hidden=64, cosmos=True)
    with pytest.raises(SystemExit, match="is not the understanding stream .*hidden_size 64 vs 32"):
        ag.main(["--policy", "unified", "--reasoner", bigger, "--renderer", cosmos_dirs[1],
                 "--out", str(tmp_path / "c")])
    # a reasoner of the other Cosmos3 size (Nano's Qwen3-VL against Edge's Nemotron, or the reverse)
    other = (ag.build_toy_vlm(str(tmp_path / "nano"), cosmos=True) if cosmos_dirs[0] in EXTRA_ARGS else
             ag.build_toy_edge(str(tmp_path / "edge")))
    with pytest.raises(SystemExit, match="is not the understanding stream .*hidden_act"):
        ag.main(["--policy", "unified", "--reasoner", other, "--renderer", cosmos_dirs[1],
                 "--out", str(tmp_path / "d")])
    # a component class this diffusers lacks (NVIDIA's newer Edge converter writes this scheduler)
    newer = tmp_path / "newer"
    shutil.copytree(cosmos_dirs[1], newer)
    index = json.loads((newer / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "Cosmos3EdgeUniPCMultistepScheduler"]
    (newer / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"has no class for its scheduler \(Cosmos3EdgeUniPCMultistepScheduler\)"):
        ag.main(["--policy", "unified", "--reasoner", cosmos_dirs[0], "--renderer", str(newer),
                 "--out", str(tmp_path / "f"), *(["--reasoner-lora-targets", ag.EDGE_REASONER_LORA_TARGETS]
                                                 if cosmos_dirs[0] in EXTRA_ARGS else [])])
    if cosmos_dirs[0] in EXTRA_ARGS:  # Edge's vision tower has q/k/v_proj too, and its MLP is fc1/fc2
        with pytest.raises(SystemExit, match="--reasoner-lora-targets .*language_model"):
            ag.main(["--policy", "unified", "--reasoner", cosmos_dirs[0], "--renderer", cosmos_dirs[1],
                     "--out", str(tmp_path / "e")])


def test_unified_toy_trains_the_shared_stream_at_its_own_lr():
    """The unified toy's reasoner LoRA is also what its generator reads: it defaults to 3e-4 there (README:
    unified vs decoupled), the pair keeps 1e-3, an explicit flag wins, and a real preset keeps its own."""
    lr = lambda *argv: ag.parse_args(list(argv))[1].reasoner_lr
    assert lr("--policy", "unified") == 3e-4 and lr() == lr("--policy", "decoupled") == 1e-3
    assert lr("--policy", "unified", "--reasoner-lr", "1e-3") == 1e-3
    assert lr("--preset", "cosmos3") == ag.PRESETS["cosmos3"]["lr"] == 5e-5  # one rate, as the official code


def test_every_flag_has_a_range_and_out_of_range_values_are_refused(capsys):
    """Each Args field has an ARG_RANGES entry; every default (and every preset's values) is in range; for each
    numeric range, a value just past each bound it names, and for each choice list a value outside it, is
    refused by parse_args in one line naming the flag, with no traceback (SystemExit 2)."""
    fields = {f.name: f.type for f in dataclasses.fields(ag.Args)}
    assert set(ag.ARG_RANGES) == set(fields)  # a new field cannot be added without a range
    assert ag.check_args(ag.Args()) is None
    for preset, values in ag.PRESETS.items():
        assert ag.check_args(ag.Args(**values)) is None, preset
    refused = 0
    for name, kind in fields.items():
        allowed, flag = ag.ARG_RANGES[name], "--" + name.replace("_", "-")
        if allowed is None or kind == "bool":  # free text; argparse's --x / --no-x can only give a bool
            continue
        if kind in ("int", "float"):
            lo, hi = allowed[:2]
            bad = [b[0] if isinstance(b, list) else b + step for b, step in ((lo, -1), (hi, 1)) if b is not None]
            if kind == "float" and isinstance(lo, (int, float)):
                bad.append(lo - 0.5)
        else:
            bad = ["not-a-choice"]
        for value in bad:
            with pytest.raises(SystemExit) as e:
                ag.parse_args([flag, str(int(value) if kind == "int" else value)])
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"error: {flag} " in err and "Traceback" not in err, (flag, value, err)
            assert len(err.strip().splitlines()) == 2  # the short usage line and the error
            refused += 1
    assert refused >= 60
    # the issue's cases, and the cross-field rules
    for flags, message in ((["--adv-clip", "-1"], "--adv-clip -1.0: a clip at or below 0"),
                           (["--mix-ratio", "1.5"], "--mix-ratio 1.5"), (["--group-size", "1"], "--group-size 1"),
                           (["--lam", "-1"], "--lam -1.0"), (["--eval-every", "-1"], "--eval-every -1"),
                           (["--srr-init-steps", "-2"], "--srr-init-steps -2"),
                           (["--policy", "unified", "--preset", "klein", "--dry-run"], "the preset's models are"),
                           (["--resolution", "40"], "--resolution 40: must be a multiple of 16"),
                           (["--preset", "cosmos3", "--resolution", "528"], "multiple of 32"),
                           (["sample", "--prompt", "x", "--refine-rounds", "-1"], "--refine-rounds -1"),
                           (["bench", "--repeats", "0"], "--repeats 0"),
                           (["--resume", "/no/such/run"], "--resume /no/such/run: no such file")):
        with pytest.raises(SystemExit):
            ag.parse_args(flags)
        assert message in capsys.readouterr().err, flags
    for argv, message in ((["--port", "70000"], "--port 70000: must be >= 0 and <= 65535"),
                          (["decompose", "x", "--llm", "y", "--out", "z", "--workers", "0"], "--workers 0"),
                          (["synthesize", "--llm", "y", "--out", "z", "--per-task", "-1"], "--per-task -1")):
        with pytest.raises(SystemExit):
            rs.main(argv)
        assert message in capsys.readouterr().err, argv


def test_zero_steps_ends_cleanly(tmp_path, capsys):
    ag.main(["--steps", "0", "--out", str(tmp_path / "run")])
    assert "--steps 0: nothing to train" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_context_grad_is_for_the_unified_policy(capsys):
    """--context-grad means something only where the context is the trained network's (Cosmos3): with the pair's
    frozen text encoders it stops with a clear error before anything loads."""
    with pytest.raises(SystemExit):
        ag.parse_args(["--context-grad"])
    assert "--context-grad is for --policy unified" in capsys.readouterr().err
    assert ag.parse_args(["--policy", "unified", "--context-grad"])[1].context_grad
