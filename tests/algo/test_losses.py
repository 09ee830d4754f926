"""PPO surrogate (asymmetric + dual clip), IS-corrected loss, KL estimators, entropy: hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from sage_megatron.algo.losses import (
    aggregate,
    entropy_from_logits,
    is_corrected_policy_loss,
    kl_loss,
    kl_penalty,
    policy_loss,
)

# Four tokens with ratios r = 1.5, 0.5, 1.1, 5.0 (clip range [0.8, 1.28], dual clip c = 3).
RATIOS = [1.5, 0.5, 1.1, 5.0]
OLD = torch.zeros(1, 4)
LOGP = torch.log(torch.tensor([RATIOS]))
ONES = torch.ones(1, 4)


def test_positive_advantage():
    # A = +1:  l1 = -r, l2 = -clip(r), loss = max(l1, l2)
    #   r=1.5: max(-1.5, -1.28) = -1.28 (clipped);  r=0.5: max(-0.5, -0.8) = -0.5
    #   r=1.1: -1.1;  r=5: max(-5, -1.28) = -1.28 (clipped)
    # token mean = (-1.28 - 0.5 - 1.1 - 1.28) / 4 = -4.16 / 4 = -1.04; clip_frac = 2/4
    out = policy_loss(logp=LOGP, old_logp=OLD, advantages=torch.tensor([1.0]), mask=ONES)
    assert out.loss.item() == pytest.approx(-1.04, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(0.5)
    assert out.clip_frac_lower.item() == 0.0
    # ppo_kl = mean(-log r) = -ln(1.5 * 0.5 * 1.1 * 5) / 4 = -ln(4.125) / 4
    assert out.ppo_kl.item() == pytest.approx(-math.log(4.125) / 4, abs=1e-6)
    # ratio_mean = (1.5 + 0.5 + 1.1 + 5) / 4 = 2.025
    assert out.ratio_mean.item() == pytest.approx(2.025, abs=1e-6)


def test_negative_advantage_dual_clip():
    # A = -1:  l1 = r, l2 = clip(r), max(l1, l2), then min(., 3) for A < 0
    #   r=1.5: max(1.5, 1.28) = 1.5;  r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    #   r=1.1: 1.1;  r=5: max(5, 1.28) = 5 -> dual clip min(5, 3) = 3
    # token mean = (1.5 + 0.8 + 1.1 + 3) / 4 = 1.6; clip_frac = 1/4; clip_frac_lower = 1/4
    out = policy_loss(logp=LOGP, old_logp=OLD, advantages=torch.tensor([-1.0]), mask=ONES)
    assert out.loss.item() == pytest.approx(1.6, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(0.25)
    assert out.clip_frac_lower.item() == pytest.approx(0.25)
    # without the dual clip: (1.5 + 0.8 + 1.1 + 5) / 4 = 2.1
    no_dual = policy_loss(logp=LOGP, old_logp=OLD, advantages=torch.tensor([-1.0]), mask=ONES, clip_c=None)
    assert no_dual.loss.item() == pytest.approx(2.1, abs=1e-6)


def test_gradient_only_through_unclipped_tokens():
    # A = +1: tokens 1 and 4 are clipped (constant), tokens 2 and 3 give d(-r)/d logp = -r, / 4 tokens
    logp = LOGP.clone().requires_grad_(True)
    policy_loss(logp=logp, old_logp=OLD, advantages=torch.tensor([1.0]), mask=ONES).loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, -1.1 / 4, 0.0]]))


def test_masks_and_aggregation_modes():
    # row 0: A=+1 (per-token -1.28, -0.5, -1.1, -1.28); row 1: A=-1 with its last token masked out
    #   (per-token 1.5, 0.8, 1.1, [3])
    logp = torch.cat([LOGP, LOGP])
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 0]])
    # token-mean: (-4.16 + 3.4) / 7 = -0.76 / 7
    tm = policy_loss(logp=logp, old_logp=old, advantages=adv, mask=mask)
    assert tm.loss.item() == pytest.approx(-0.76 / 7, abs=1e-6)
    assert tm.clip_frac.item() == pytest.approx(3 / 7)           # 2 in row 0 + 1 in row 1
    assert tm.clip_frac_lower.item() == 0.0                       # the dual-clipped token is masked
    # seq-mean-token-mean: (-4.16/4 + 3.4/3) / 2 = (-1.04 + 1.1333333) / 2
    sm = policy_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, agg="seq-mean-token-mean")
    assert sm.loss.item() == pytest.approx((-1.04 + 3.4 / 3) / 2, abs=1e-6)
    # seq-mean-token-sum: (-4.16 + 3.4) / 2 = -0.38
    ss = policy_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, agg="seq-mean-token-sum")
    assert ss.loss.item() == pytest.approx(-0.38, abs=1e-6)
    # a global token count (micro-batches of one mini-batch): -0.76 / 10
    g = policy_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, num_tokens=10)
    assert g.loss.item() == pytest.approx(-0.076, abs=1e-6)
    # per-token advantages (B, T) give the same as (B,)
    tok = policy_loss(logp=logp, old_logp=old, advantages=adv[:, None].expand(2, 4), mask=mask)
    assert tok.loss.item() == pytest.approx(tm.loss.item())


def test_aggregate_errors_and_empty_mask():
    assert aggregate(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), mode="sum")
    with pytest.raises(ValueError, match="dual-clip"):
        policy_loss(logp=LOGP, old_logp=OLD, advantages=torch.tensor([1.0]), mask=ONES, clip_c=1.0)


def test_is_corrected_loss():
    # current policy on the ORIGINAL prompt: p = 0.3; behaviour policy on the HINTED prompt: p = 0.6
    # -> r = 0.3 / 0.6 = 0.5 for both tokens
    logp_orig = torch.log(torch.tensor([[0.3, 0.3]])).requires_grad_(True)
    behav = torch.log(torch.tensor([[0.6, 0.6]]))
    pos = is_corrected_policy_loss(logp_original=logp_orig, behavior_logp_hinted=behav,
                                   advantages=torch.tensor([2.0]), mask=torch.ones(1, 2))
    # A = 2: max(-2*0.5, -2*0.8) = -1 per token (unclipped) -> mean -1; d/dlogp = -A r / 2 = -0.5 per token
    assert pos.loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert pos.ratio_mean.item() == pytest.approx(0.5, abs=1e-6)
    pos.loss.backward()
    torch.testing.assert_close(logp_orig.grad, torch.tensor([[-0.5, -0.5]]))
    # A = -2: max(2*0.5, 2*0.8) = 1.6 (clipped at 1 - 0.2), below the dual clip 2*3 = 6
    neg = is_corrected_policy_loss(logp_original=logp_orig.detach(), behavior_logp_hinted=behav,
                                   advantages=torch.tensor([-2.0]), mask=torch.ones(1, 2))
    assert neg.loss.item() == pytest.approx(1.6, abs=1e-6)
    assert neg.clip_frac.item() == 1.0


def test_kl_estimators():
    # logp = ln 0.5, ref = ln 0.25
    #   k1 = ln 0.5 - ln 0.25 = ln 2 = 0.6931472
    #   k2 = 0.5 (ln 2)^2 = 0.2402265
    #   k3: d = ref - logp = -ln 2; e^d - d - 1 = 0.5 + ln 2 - 1 = 0.1931472
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    assert kl_penalty(logp, ref, kind="k1").item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_penalty(logp, ref, kind="k2").item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-6)
    assert kl_penalty(logp, ref, kind="low_var_kl").item() == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    assert kl_penalty(logp, logp, kind="k3").item() == 0.0
    # clamps: d = -30 -> clamp -20: e^-20 + 20 - 1 = 19.000000002 -> 10;  d = +25 -> clamp 20: e^20 - 21 -> 10
    big = kl_penalty(torch.tensor([[0.0, 0.0]]), torch.tensor([[-30.0, 25.0]]), kind="k3")
    assert big.tolist() == [[10.0, 10.0]]
    with pytest.raises(ValueError, match="kl kind"):
        kl_penalty(logp, ref, kind="k4")


def test_kl_loss_masked_mean():
    # per-token k1 = [ln 2, 5, (masked)] -> (ln 2 + 5) / 2
    logp = torch.tensor([[math.log(0.5), 5.0, 100.0]])
    ref = torch.tensor([[math.log(0.25), 0.0, 0.0]])
    out = kl_loss(logp=logp, ref_logp=ref, mask=torch.tensor([[1.0, 1.0, 0.0]]), kind="k1")
    assert out.item() == pytest.approx((math.log(2) + 5) / 2, abs=1e-6)


def test_entropy_from_logits():
    # uniform over 4: ln 4 = 1.3862944
    # logits [ln 3, 0] -> p = (0.75, 0.25): H = 0.75 ln(4/3) + 0.25 ln 4 = 0.2157616 + 0.3465736 = 0.5623351
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -math.inf, -math.inf]]])
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    assert h[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4), abs=1e-6)
