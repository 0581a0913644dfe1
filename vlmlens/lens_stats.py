"""What the lens records inside the attention function (called with the layer's q, k, v).

* ``record_attention``: for non-image query rows, the attention mass on image keys per head
  and the head-averaged map over image keys (rows at or after ``plan.map_from``), and every
  head's own map for the last prompt token (``map_from``): [layer, head, n_image] is small.
* ``record_contributions``: at the last prompt token, the attention block's output and the
  image keys' part of it (VisiPruner-style contributions; see analysis/attention.py).

Both recompute ``softmax(q·Kᵀ·scale + mask)`` only for the rows they need, in float32, chunked.
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv


def record_attention(state, module, layer, query, key, qpos, kpos, allowed, scale, chunk=256):
    rows = torch.nonzero(~state.is_image(qpos) & (qpos > state.image_pos[0]), as_tuple=False).flatten()
    img_keys = torch.nonzero(state.is_image(kpos), as_tuple=False).flatten()
    if rows.numel() == 0 or img_keys.numel() == 0:
        # no recorded rows, or image keys removed from the cache: no image mass anywhere
        zero_rows(state, layer, module, query, qpos)
        return
    n_rep = query.shape[1] // key.shape[1]
    k = repeat_kv(key, n_rep)[0].float()          # [H, kv, d]
    shares, maps, map_pos = [], [], []
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        q = query[0, :, r, :].float()              # [H, R, d]
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed[r][None], float("-inf"))
        p = torch.softmax(s, dim=-1)[:, :, img_keys]   # [H, R, n_img]
        shares.append(p.sum(-1))                    # [H, R]
        mrows = qpos[r] >= state.plan.map_from
        if bool(mrows.any()):
            maps.append(p[:, mrows].mean(0))         # [R', n_img]
            map_pos.append(qpos[r][mrows])
        at = torch.nonzero(qpos[r] == state.plan.map_from).flatten()
        if at.numel() and layer not in state.head_maps:
            state.head_maps[layer] = p[:, int(at[0])].cpu()   # [H, n_img]: each head's map, last prompt token
    share = torch.cat(shares, dim=1)
    # full per-forward row set: image queries NaN, queries before the image 0
    full = torch.zeros(query.shape[1], qpos.numel(), device=share.device)
    full[:, state.is_image(qpos)] = float("nan")
    full[:, rows] = share
    state.share[layer].append((qpos.cpu().numpy(), full.cpu()))
    if maps:
        state.maps[layer].append((torch.cat(map_pos).cpu().numpy(), torch.cat(maps, 0).cpu()))


def zero_rows(state, layer, module, query, qpos):
    full = torch.zeros(query.shape[1], qpos.numel())
    full[:, state.is_image(qpos).cpu()] = float("nan")
    state.share[layer].append((qpos.cpu().numpy(), full))


def record_contributions(state, module, layer, query, key, value, qpos, kpos, allowed, scale) -> None:
    """Called by the lens (``Plan.record_contrib``) inside the attention function.

    For the query at position ``state.plan.map_from`` (the last prompt token) it recomputes
    the attention row ``a[h, j] = softmax_j(q_h . k_hj * scale)`` (same masks as the layer)
    and, with ``W_O`` the layer's ``o_proj``:

    * ``o = W_O concat_h(sum_j a[h, j] v[h, j]) + b_O``  -- the attention block's output
      (the o_proj output, before the residual add and before any post-attention norm),
    * ``c_j = W_O concat_h(a[h, j] v[h, j])`` for every image key j (no bias),

    and stores ``state.contrib[layer] = (o [d], sum_j c_j [d], |c_j| [n_image])`` on the CPU
    (float32; NaN norms for image tokens no longer in the cache). Cost per layer: one query
    row against all keys plus an ``[n_image, H*d_head] x [H*d_head, d_model]`` product. A
    module without ``o_proj`` is recorded in head space (W_O = identity).
    """
    rows = torch.nonzero(qpos == state.plan.map_from).flatten()
    if rows.numel() == 0 or layer in state.contrib:
        return
    r = int(rows[0])
    n_rep = query.shape[1] // key.shape[1]
    k = repeat_kv(key, n_rep)[0].float()                      # [H, kv, dh]
    v = repeat_kv(value, n_rep)[0].float()
    s = torch.einsum("hd,hkd->hk", query[0, :, r].float(), k) * scale
    s = s.masked_fill(~allowed[r][None], float("-inf"))
    a = torch.softmax(s, dim=-1)                              # [H, kv]
    heads = torch.einsum("hk,hkd->hd", a, v).reshape(-1)      # [H*dh], head-major like the model
    img = torch.nonzero(state.is_image(kpos)).flatten()
    per_tok = (a[:, img, None] * v[:, img]).permute(1, 0, 2).reshape(img.numel(), heads.numel())
    proj = getattr(module, "o_proj", None)
    if proj is not None:
        w = proj.weight.float()
        o = heads @ w.T + (proj.bias.float() if proj.bias is not None else 0.0)
        c = per_tok @ w.T                                     # [n_img_keys, d_model]
    else:
        o, c = heads, per_tok
    norms = torch.full((state.image_pos.numel(),), float("nan"), device=c.device)
    norms[torch.searchsorted(state.image_pos, kpos[img])] = c.norm(dim=-1)
    state.contrib[layer] = (o.cpu(), c.sum(0).cpu(), norms.cpu())
