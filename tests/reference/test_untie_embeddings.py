#!/usr/bin/python3
"""model.untie_embeddings (Megatron's --untie-embeddings-and-output-weights)
end to end: mtnlgd, mtnlgctl ckpt and mtnlg-eval against PyTorch.

usage: test_untie_embeddings.py MTNLGD JOB.json MTNLGCTL MTNLG-EVAL
The tiny model (2 layers, 64 wide, vocab 250 padded to 256) with an output layer of its
own, lm_head.weight, beside the token embedding wte.weight:
  - test_tpT_ppP_dpD_losses_match_torch / _weights_match_torch: from random
    weights (torch_gpt.random_weights with untie, given as model.init_from;
    lm_head is not wte) 3 steps of AdamW (constant lr, no clipping, weight
    decay on the matrices, wte and lm_head among them) at (tp, pp, dp) =
    (1,1,1), (1,2,1) (the last stage holds lm_head, no copy of wte) and
    (2,2,2) (both vocabulary-split, ZeRO slices): every step's loss within
    1e-5 relative of torch_gpt.py's untied float64 run, the first step's
    gradient norm and parameter norm within 1e-5 (lm_head and wte each
    counted once; at pp 2 the export a directory written by both stages), the
    exported update within 1e-3 of torch's relative over the whole model and
    over lm_head and wte each;
  - test_the_head_is_untied: the trained lm_head and wte are far apart, and
    torch's tied run from the same wte gives losses far from these (a head
    still reading wte could not pass the checks above);
  - test_export_says_untied: the export holds lm_head.weight (250, 64) and
    says "tie_word_embeddings" false in its metadata and config.json; its
    files (and at pp 2 the directory's index) name the tensors as Hugging
    Face's GPT2LMHeadModel state dict does, transformer.<name> and a
    top-level lm_head.weight (transformers itself is not run here). The
    init file says "False" (Python's spelling): read without regard to case;
  - test_philox_init_layouts_agree: without init_from, the project's Philox
    init at tp 1 and at tp 2 x pp 2 x dp 2 trains alike (losses within 1e-5,
    exports within 1e-5 of the update), and the initial lm_head (step 0
    export after a step at lr 0) is N(0, init_std) and not wte;
  - test_interleaved_layout_agrees: 4 layers in interleaved 1F1B (tp 2 x
    pp 2, 2 virtual stages) train as on one device, the directory export's
    lm_head in the last stage's files (each element within 1e-5);
  - test_resume_is_bit_exact: stopped after step 2 (exit_interval) at
    tp 1 x pp 2 x dp 2 and resumed, the export is the straight run's bit for
    bit; resumed under dp 1 (the ZeRO slices read under another width) it
    follows within 1e-5;
  - test_checkpoint_load_under_another_layout_is_init_from_its_export:
    checkpoint.load of the tp 1 x pp 2 checkpoint by an untied job at
    tp 2 x pp 1 trains as model.init_from its `ckpt export` does;
  - test_reshard_and_export_round_trip: `mtnlgctl ckpt reshard` to
    tp 2 x pp 1 and back to tp 1 x pp 2: `mtnlgctl ckpt export` of each is
    the original's export bit for bit (lm_head too; the original's a
    directory in GPT2LMHeadModel's names, read back by model.init_from
    below), and the tp 2 one resumes to the straight run's losses;
  - test_eval_reads_the_head: mtnlg-eval's perplexity of the untied export
    is torch's with lm_head (1e-6), far from torch's with wte;
    test_eval_generates_with_the_head: its greedy generation (the key-value
    cache's decode) is torch's with lm_head, token for token (its file's
    metadata says "tie_word_embeddings": "0", no word either way, and the
    config.json beside it false);
  - test_untied_job_from_a_tied_file_copies_wte: a tied file (no
    lm_head.weight) as init_from of an untied job at tp 1 and tp 2 x pp 2
    (the last stage holds no wte) starts lm_head as a copy of the file's
    wte, saying so: losses within 1e-5 of torch's untied run from that copy,
    lm_head and wte within 1e-3 of its update;
  - refusals, each naming model.untie_embeddings: an untied export as
    init_from of a tied job, an untied
    checkpoint resumed by a tied job at pp 2 and a tied one by an untied job
    at pp 1 (where the parameter counts differ too: the key is named first,
    with the value to set), and an untied checkpoint given as
    checkpoint.load to a tied job.
Exit 77 (skip) without torch.
"""
import array
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
    torch.set_num_threads(1)
except ImportError as e:
    print(f"SKIP: PyTorch not importable ({e})")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import torch_gpt  # noqa: E402
from local_cluster import check, output_losses  # noqa: E402

# a vocabulary of 250, padded to 256: lm_head has padding rows, as wte
N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ = 2, 64, 4, 250, 64
G, B, STEPS = 8, 2, 3
LR, BETAS, EPS, WD = 2e-3, (0.9, 0.95), 1e-3, 0.1
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-3
UNTIE = "model.untie_embeddings=true"


def records(out):
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def losses_of(out):
    return [loss for _, loss in output_losses(out)]


def torch_run(weights, cfg, tokens, untie):
    """Losses, the first step's gradient norm and parameter norm after its
    update, and the final weights of STEPS steps, in float64."""
    p, opt = torch_gpt.adamw64(weights, LR, WD, BETAS, EPS)
    tok = torch.tensor(tokens, dtype=torch.long)
    losses, gnorm, pnorm = [], None, None
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        rows = torch.stack([tok[k * SEQ:k * SEQ + SEQ + 1] for k in range(s * G, s * G + G)])
        _, loss = torch_gpt.forward(p, cfg, rows[:, :-1], rows[:, 1:], untie=untie)
        loss.backward()
        if s == 0:
            gnorm = math.sqrt(sum(float((t.grad ** 2).sum()) for t in p.values()))
        opt.step()
        if s == 0:
            pnorm = math.sqrt(sum(float((t.detach() ** 2).sum()) for t in p.values()))
        losses.append(loss.item())
    return losses, gnorm, pnorm, {k: v.detach() for k, v in p.items()}


def run(mtnlgd, job, tokens, tp, pp, dp, *sets, steps=STEPS):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
           "--set", f"data.path={tokens}", "--set", f"train.steps={steps}",
           "--set", f"train.global_batch={G}", "--set", f"parallel.micro_batch={B}",
           "--set", f"parallel.tp={tp}", "--set", f"parallel.pp={pp}",
           "--set", f"parallel.dp_min={dp}", "--set", "train.lr.schedule=constant",
           "--set", f"train.lr.peak={LR}", "--set", "train.lr.warmup_steps=0",
           "--set", f"train.adam.eps={EPS}", "--set", f"train.adam.beta1={BETAS[0]}",
           "--set", f"train.adam.beta2={BETAS[1]}", "--set", f"train.weight_decay={WD}",
           "--set", "train.clip_grad=0", "--set", f"model.vocab_size={VOCAB}"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def rel_update(ours, ref, init, names):
    """||ours - ref|| / ||ref - init|| over the named tensors."""
    num = den = 0.0
    for k in names:
        a, b = ours[k].to(torch.float64).reshape(-1), ref[k].to(torch.float64).reshape(-1)
        num += float(((a - b) ** 2).sum())
        den += float(((b - init[k].to(torch.float64).reshape(-1)) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else float("inf")


def worst_rel(a, b):
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def load(path):
    """A single file's tensors and metadata, or a directory's (Hugging
    Face's sharded layout) tensors and its first file's metadata."""
    if os.path.isdir(path):
        w, meta = {}, {}
        for name in sorted(os.listdir(path)):
            if name.startswith("model-") and name.endswith(".safetensors"):
                t, m = torch_gpt.st_load(os.path.join(path, name))
                w.update(t)
                meta = meta or m
        return w, meta
    return torch_gpt.st_load(path) if os.path.exists(path) else ({}, {})


def file_names(path):
    """The tensor names as the export's files (and a directory's index)
    hold them, Hugging Face's "transformer." prefix kept: {name}, or None
    where the index and the files disagree."""
    if not os.path.isdir(path):
        return set(torch_gpt.st_load(path, raw=True)[0]) if os.path.exists(path) else set()
    names = set()
    for name in sorted(os.listdir(path)):
        if name.startswith("model-") and name.endswith(".safetensors"):
            names |= set(torch_gpt.st_load(os.path.join(path, name), raw=True)[0])
    index = os.path.join(path, "model.safetensors.index.json")
    mapped = set(json.load(open(index))["weight_map"]) if os.path.exists(index) else set()
    return names if names == mapped else None


def gpt2_lm_head_layout(names, n_layer=N_LAYER):
    """Whether names are Hugging Face GPT2LMHeadModel's state dict with an
    untied head: the base model's tensors under transformer., lm_head.weight
    at the top level (what its from_pretrained loads without a missing or
    unexpected key)."""
    base = torch_gpt.param_shapes(torch_gpt.Config(n_layer, N_EMBD, N_HEAD, VOCAB, SEQ))
    return names == {"transformer." + k for k in base} | {"lm_head.weight"}


def same_tensors(a, b):
    return bool(a) and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def torch_checks(mtnlgd, job, tmp, tpath, tokens):
    failures = 0
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ)
    weights = torch_gpt.random_weights(cfg, 2024, untie=True)
    ref_losses, ref_gnorm, ref_pnorm, ref_w = torch_run(weights, cfg, tokens, True)
    tied_w = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    tied_losses = torch_run(tied_w, cfg, tokens, False)[0]
    print(f"torch, untied: {ref_losses} (first grad norm {ref_gnorm:.9g})\n"
          f"torch, tied from the same wte: {tied_losses}")
    init = os.path.join(tmp, "init.safetensors")
    # "False" as Python writers spell it: read without regard to case
    torch_gpt.st_save(init, weights, {**cfg.metadata(), "tie_word_embeddings": "False"})
    tied_init = os.path.join(tmp, "tied", "init.safetensors")
    os.makedirs(os.path.dirname(tied_init))
    torch_gpt.st_save(tied_init, tied_w, cfg.metadata())
    exports = {}
    for tp, pp, dp in ((1, 1, 1), (1, 2, 1), (2, 2, 2)):
        name = f"test_tp{tp}_pp{pp}_dp{dp}"
        # at pp 2 Hugging Face's sharded layout, each stage writing its files
        export = os.path.join(tmp, f"untied-{tp}-{pp}-{dp}" + ("/" if pp > 1 else ".safetensors"))
        out = run(mtnlgd, job, tpath, tp, pp, dp, UNTIE, f"model.init_from={init}",
                  f"checkpoint.export={export}", "train.log_params_norm=true")
        if out.returncode != 0:
            print(out.stderr[-2000:])
        recs = [r for r in records(out.stdout) if "loss" in r]
        losses = [r["loss"] for r in recs]
        gnorm = recs[0].get("grad_norm", float("nan")) if recs else float("nan")
        pnorm = recs[0].get("params_norm", float("nan")) if recs else float("nan")
        worst = worst_rel(losses, ref_losses)
        failures += check(f"{name}_losses_match_torch",
                          out.returncode == 0 and worst <= LOSS_TOL
                          and abs(gnorm - ref_gnorm) <= LOSS_TOL * ref_gnorm
                          and abs(pnorm - ref_pnorm) <= LOSS_TOL * ref_pnorm,
                          f"exit {out.returncode}, worst step {worst:.2e}: {losses}; grad norm "
                          f"{gnorm} vs torch {ref_gnorm:.9g}, params norm {pnorm} vs torch "
                          f"{ref_pnorm:.9g}")
        w = load(export)[0]
        ok = set(w) == set(weights)
        rel = rel_update(w, ref_w, weights, weights) if ok else float("inf")
        rel_head = rel_update(w, ref_w, weights, ["lm_head.weight"]) if ok else float("inf")
        rel_wte = rel_update(w, ref_w, weights, ["wte.weight"]) if ok else float("inf")
        failures += check(f"{name}_weights_match_torch",
                          max(rel, rel_head, rel_wte) <= WEIGHT_TOL,
                          f"update off by {rel:.2e} (lm_head {rel_head:.2e}, wte {rel_wte:.2e})"
                          f" relative; tensors {sorted(set(w) ^ set(weights))} differ")
        exports[(tp, pp, dp)] = export
    w, meta = load(exports[(1, 1, 1)])
    apart = (float((w["lm_head.weight"] - w["wte.weight"]).norm() / w["wte.weight"].norm())
             if "lm_head.weight" in w else 0.0)
    gap = worst_rel(tied_losses, ref_losses)
    failures += check("test_the_head_is_untied", apart > 0.5 and gap > 10 * LOSS_TOL,
                      f"lm_head - wte is {apart:.3g} of wte; tied run {gap:.2e} from untied")
    hf = json.load(open(os.path.join(tmp, "config.json")))
    layouts = {k: file_names(e) for k, e in exports.items()}
    failures += check("test_export_says_untied",
                      tuple(w.get("lm_head.weight", torch.empty(0)).shape) == (VOCAB, N_EMBD)
                      and meta.get("tie_word_embeddings") == "false"
                      and hf.get("tie_word_embeddings") is False
                      and all(gpt2_lm_head_layout(n) for n in layouts.values()),
                      f"metadata {meta}; config.json tie_word_embeddings "
                      f"{hf.get('tie_word_embeddings')}; names in the files (and index) "
                      f"{ {k: sorted(v or [])[:4] for k, v in layouts.items()} }")

    # an untied file is refused by a tied job
    out = run(mtnlgd, job, tpath, 1, 1, 1, f"model.init_from={exports[(1, 1, 1)]}")
    failures += check("test_init_from_refuses_the_other_head",
                      out.returncode != 0 and "the job's model ties it to wte: set "
                      "model.untie_embeddings" in out.stderr,
                      f"untied into tied: exit {out.returncode} {out.stderr[-300:]}")
    # a tied file (no lm_head.weight) starts an untied job with lm_head a
    # copy of its wte: torch's untied run from those weights, at pp 1 (wte
    # on the same stage) and tp 2 x pp 2 (the last stage holds no wte: it
    # reads the file's for its vocabulary slice of lm_head)
    copied = {**tied_w, "lm_head.weight": tied_w["wte.weight"].clone()}
    copy_losses, _, _, copy_w = torch_run(copied, cfg, tokens, True)
    details, ok = [], True
    for tp, pp in ((1, 1), (2, 2)):
        export = os.path.join(tmp, f"copied-{tp}-{pp}.safetensors")
        o = run(mtnlgd, job, tpath, tp, pp, 1, UNTIE, f"model.init_from={tied_init}",
                f"checkpoint.export={export}")
        w = load(export)[0]
        worst = worst_rel(losses_of(o.stdout), copy_losses)
        rel = (rel_update(w, copy_w, copied, ["lm_head.weight", "wte.weight"])
               if set(w) == set(copied) else float("inf"))
        said = "lm_head.weight (model.untie_embeddings) starts as a copy of its wte.weight"
        ok = ok and o.returncode == 0 and worst <= LOSS_TOL and rel <= WEIGHT_TOL \
            and said in o.stderr
        details.append(f"tp {tp} x pp {pp}: exit {o.returncode}, losses {worst:.2e} from "
                       f"torch's, lm_head and wte {rel:.2e} of the update, said "
                       f"{said in o.stderr} {o.stderr[-300:] if o.returncode else ''}")
    failures += check("test_untied_job_from_a_tied_file_copies_wte",
                      ok and worst_rel(copy_losses, ref_losses) > 10 * LOSS_TOL,
                      "; ".join(details))
    return failures, exports[(1, 1, 1)]


def philox_checks(mtnlgd, job, tmp, tpath):
    failures = 0
    runs = {}
    for tp, pp, dp in ((1, 1, 1), (2, 2, 2)):
        export = os.path.join(tmp, "philox", f"p-{tp}-{pp}-{dp}.safetensors")
        os.makedirs(os.path.dirname(export), exist_ok=True)
        out = run(mtnlgd, job, tpath, tp, pp, dp, UNTIE, f"checkpoint.export={export}")
        runs[(tp, pp, dp)] = (out, losses_of(out.stdout), load(export)[0])
    zero = os.path.join(tmp, "philox", "step0.safetensors")
    # one step at lr 0 (the first of a warmup): the initial weights
    out0 = run(mtnlgd, job, tpath, 2, 2, 1, UNTIE, "train.lr.warmup_steps=1",
               f"checkpoint.export={zero}", steps=1)
    w0 = load(zero)[0]
    (o1, l1, w1), (o2, l2, w2) = runs[(1, 1, 1)], runs[(2, 2, 2)]
    ok = o1.returncode == 0 and o2.returncode == 0 and out0.returncode == 0 and set(w1) == set(w2)
    ok = ok and "lm_head.weight" in w0
    rel = rel_update(w2, w1, w0, w1) if ok else float("inf")
    head0 = w0.get("lm_head.weight", torch.zeros(1))
    std = float(head0.std())
    apart = float((head0 - w0["wte.weight"]).norm() / w0["wte.weight"].norm()) if ok else 0.0
    failures += check("test_philox_init_layouts_agree",
                      ok and worst_rel(l2, l1) <= LOSS_TOL and rel <= 1e-5
                      and abs(std - 0.02) < 0.002 and apart > 1.0,
                      f"exits {o1.returncode} {o2.returncode} {out0.returncode}; losses {l1} vs "
                      f"{l2}; exports {rel:.2e} of the update apart; initial lm_head std "
                      f"{std:.4g}, {apart:.3g} of wte from it {o2.stderr[-400:]}")
    # interleaved 1F1B: 4 layers in 4 chunks over pp 2, lm_head in the last
    # stage's last chunk and its part of a directory export
    four = {}
    for tp, pp, v in ((1, 1, 1), (2, 2, 2)):
        export = os.path.join(tmp, "philox", f"v-{tp}-{pp}-{v}/")
        out = run(mtnlgd, job, tpath, tp, pp, 1, UNTIE, "model.n_layer=4",
                  f"parallel.virtual_stages={v}", f"checkpoint.export={export}")
        four[v] = (out.returncode, losses_of(out.stdout), load(export)[0], out.stderr[-400:])
    (r1, l1, w1, _), (r2, l2, w2, err) = four[1], four[2]
    ok = r1 == 0 and r2 == 0 and "lm_head.weight" in w2 and set(w1) == set(w2)
    diff = max((float((w1[k] - w2[k]).abs().max()) for k in w1), default=1.0) if ok else 1.0
    failures += check("test_interleaved_layout_agrees",
                      ok and worst_rel(l2, l1) <= LOSS_TOL and diff < 1e-5,
                      f"exits {r1} {r2}; losses {l1} vs {l2}; exports {diff:.2e} apart {err}")
    return failures


def checkpoint_checks(mtnlgd, job, ctl, tmp, tpath):
    failures = 0
    straight_e = os.path.join(tmp, "ck", "straight.safetensors")
    os.makedirs(os.path.dirname(straight_e))
    steps = 4
    straight = run(mtnlgd, job, tpath, 1, 2, 2, UNTIE, f"checkpoint.export={straight_e}",
                   steps=steps)
    ck = os.path.join(tmp, "ck", "a")
    a = run(mtnlgd, job, tpath, 1, 2, 2, UNTIE, f"checkpoint.dir={ck}", "train.exit_interval=2",
            steps=steps)
    job_dir = os.path.join(ck, "tiny-demo")
    saved = os.path.join(tmp, "ck", "saved")  # the step-2 checkpoint, before the resume
    shutil.copytree(job_dir, saved, symlinks=True)
    resumed_e = os.path.join(tmp, "ck", "resumed.safetensors")
    b = run(mtnlgd, job, tpath, 1, 2, 2, UNTIE, f"checkpoint.dir={ck}",
            f"checkpoint.export={resumed_e}", steps=steps)
    want = losses_of(straight.stdout)
    got = losses_of(a.stdout) + losses_of(b.stdout)
    ws, wr = load(straight_e)[0], load(resumed_e)[0]
    failures += check("test_resume_is_bit_exact",
                      straight.returncode == 0 and a.returncode == 0 and b.returncode == 0
                      and len(want) == steps and got == want and "lm_head.weight" in ws
                      and same_tensors(ws, wr),
                      f"exits {straight.returncode} {a.returncode} {b.returncode}: straight "
                      f"{want}, stopped and resumed {got}; exports equal {same_tensors(ws, wr)} "
                      f"{b.stderr[-400:]}")
    # the step-2 checkpoint under dp 1: each rank reads the whole shard's slices
    ck1 = os.path.join(tmp, "ck", "dp1")
    shutil.copytree(saved, os.path.join(ck1, "tiny-demo"), symlinks=True)
    c = run(mtnlgd, job, tpath, 1, 2, 1, UNTIE, f"checkpoint.dir={ck1}", steps=steps)
    lc = losses_of(c.stdout)
    failures += check("test_resume_under_another_dp_follows",
                      c.returncode == 0 and worst_rel(lc, want[2:]) <= LOSS_TOL,
                      f"exit {c.returncode}: {lc} vs {want[2:]} {c.stderr[-400:]}")

    # reshard to tp 2 x pp 1, and from there back to tp 1 x pp 2: the same tensors
    r2 = os.path.join(tmp, "ck", "tp2", "tiny-demo")
    r3 = os.path.join(tmp, "ck", "back", "tiny-demo")
    x = subprocess.run([ctl, "ckpt", "reshard", saved, r2, "--tp", "2", "--pp", "1"],
                       capture_output=True, text=True)
    y = subprocess.run([ctl, "ckpt", "reshard", r2, r3, "--tp", "1", "--pp", "2"],
                       capture_output=True, text=True)
    ex = {}
    # the saved one to a directory (its index and files in GPT2LMHeadModel's
    # names, read back by model.init_from below), the others to one file
    saved_export = os.path.join(tmp, "ck", "export-saved") + "/"
    for name, d in (("saved", saved), ("tp2", r2), ("back", r3)):
        path = saved_export if name == "saved" else os.path.join(tmp, "ck", f"export-{name}",
                                                                  "w.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        e = subprocess.run([ctl, "ckpt", "export", d, path], capture_output=True, text=True)
        ex[name] = load(path)[0] if e.returncode == 0 else {}
        if e.returncode:
            print(e.stderr[-400:])
    d = run(mtnlgd, job, tpath, 2, 1, 1, UNTIE, f"checkpoint.dir={os.path.dirname(r2)}",
            steps=steps)
    ld = losses_of(d.stdout)
    failures += check("test_reshard_and_export_round_trip",
                      x.returncode == 0 and y.returncode == 0 and "lm_head.weight" in ex["saved"]
                      and gpt2_lm_head_layout(file_names(saved_export))
                      and same_tensors(ex["saved"], ex["tp2"])
                      and same_tensors(ex["saved"], ex["back"]) and d.returncode == 0
                      and worst_rel(ld, want[2:]) <= LOSS_TOL,
                      f"reshard exits {x.returncode} {y.returncode} {x.stderr[-300:]}"
                      f"{y.stderr[-300:]}; exports equal {same_tensors(ex['saved'], ex['tp2'])} "
                      f"{same_tensors(ex['saved'], ex['back'])}; tp 2 resumed {ld} vs "
                      f"{want[2:]} {d.stderr[-300:]}")

    # checkpoint.load of the untied checkpoint (tp 1 x pp 2) by an untied job
    # at tp 2 x pp 1: each rank reads its lm_head slice from the saved
    # layout's files; the same run as model.init_from its export
    ld = run(mtnlgd, job, tpath, 2, 1, 1, UNTIE, f"checkpoint.load={saved}", steps=2)
    ie = run(mtnlgd, job, tpath, 2, 1, 1, UNTIE, f"model.init_from={saved_export}", steps=2)
    failures += check("test_checkpoint_load_under_another_layout_is_init_from_its_export",
                      ld.returncode == 0 and ie.returncode == 0
                      and len(losses_of(ld.stdout)) == 2
                      and losses_of(ld.stdout) == losses_of(ie.stdout),
                      f"exits {ld.returncode} {ie.returncode}: load {losses_of(ld.stdout)}, "
                      f"init_from {losses_of(ie.stdout)} {ld.stderr[-300:]}")

    # a tied job on the untied checkpoint, resumed (pp 2: the last stage's
    # lm_head is the size of its tied wte) or loaded, and an untied job
    # resuming a tied checkpoint at pp 1 (the sizes differ: the key is
    # named all the same, before the parameter count)
    flip = run(mtnlgd, job, tpath, 1, 2, 2, "model.untie_embeddings=false",
               f"checkpoint.dir={ck1}", steps=steps + 1)
    ckt = os.path.join(tmp, "ck", "tied")
    tied = run(mtnlgd, job, tpath, 1, 1, 1, f"checkpoint.dir={ckt}", steps=1)
    back = run(mtnlgd, job, tpath, 1, 1, 1, UNTIE, f"checkpoint.dir={ckt}", steps=2)
    load_ = run(mtnlgd, job, tpath, 1, 2, 1, f"checkpoint.load={saved}", steps=1)
    failures += check("test_checkpoints_refuse_the_other_head",
                      all(o.returncode != 0 and f"embeddings, the job's model.untie_embeddings is "
                          f"{v}: another model (set model.untie_embeddings to {was}, or give the "
                          f"job a checkpoint.dir of its own)" in o.stderr
                          for o, v, was in ((flip, "false", "true"), (back, "true", "false")))
                      and load_.returncode != 0 and "model.untie_embeddings: the checkpoint's "
                      "model has untied embeddings, the job's tied" in load_.stderr
                      and tied.returncode == 0,
                      f"untied resumed tied: exit {flip.returncode} {flip.stderr[-300:]}; tied "
                      f"resumed untied: exit {back.returncode} {back.stderr[-300:]}; untied "
                      f"loaded by tied: exit {load_.returncode} {load_.stderr[-300:]}")
    return failures


def eval_checks(evaluator, export, tmp):
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ)
    w = {k: v.to(torch.float64) for k, v in load(export)[0].items()}
    doc = os.path.join(tmp, "doc.txt")
    r = random.Random(5)
    raw = bytes(r.randrange(32, 127) for _ in range(1000))
    with open(doc, "wb") as f:
        f.write(raw)
    ids = list(raw)

    def nll_of(untie):
        nll = 0.0
        with torch.no_grad():
            for a in range(0, len(ids) - 1, SEQ):
                win = ids[a:a + SEQ + 1]
                logits, _ = torch_gpt.forward(w, cfg, torch.tensor([win[:-1]]), untie=untie)
                logp = logits[0].log_softmax(-1)
                nll -= float(logp[torch.arange(len(win) - 1), torch.tensor(win[1:])].sum())
        return nll

    want, tied = nll_of(True), nll_of(False)
    out = subprocess.run([evaluator, "perplexity", export, doc, "--batch", "4", "-o", "json"],
                         capture_output=True, text=True, timeout=120)
    ours = json.loads(out.stdout) if out.returncode == 0 else {}
    rel = abs(ours.get("nll", 0.0) - want) / want
    failures = check("test_eval_reads_the_head",
                     out.returncode == 0 and rel <= 1e-6 and abs(tied - want) / want > 1e-3,
                     f"exit {out.returncode}: nll {ours.get('nll')} vs torch's {want:.10g} with "
                     f"lm_head ({rel:.2e}), {tied:.10g} with wte {out.stderr[-300:]}")
    # greedy generation with the key-value cache (mt_gpt_decode's head):
    # torch's tokens with lm_head, up to a near tie of its two best logits.
    # A random model whose blocks' matrices are 10 times GPT-2's initial
    # scale (as test_eval's), so it does not repeat one token
    rand = torch_gpt.random_weights(cfg, 31, untie=True)
    for k, v in rand.items():
        if k.startswith("h.") and v.dim() == 2:
            rand[k] = v * 10.0
    gen = os.path.join(tmp, "gen", "random.safetensors")
    os.makedirs(os.path.dirname(gen))
    # metadata that says neither true nor false is no word on it: config.json beside it says
    torch_gpt.st_save(gen, rand, {**cfg.metadata(), "tie_word_embeddings": "0"})
    with open(os.path.join(os.path.dirname(gen), "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "tie_word_embeddings": False}, f)
    w = {k: v.to(torch.float64) for k, v in rand.items()}
    prompt, n = "The untied head", 24
    g = subprocess.run([evaluator, "generate", gen, "--prompt", prompt, "--tokens", str(n),
                        "--temperature", "0", "-o", "json"], capture_output=True, text=True,
                       timeout=120)
    got = json.loads(g.stdout)["tokens"] if g.returncode == 0 else []
    ids, want_ids, upto = list(prompt.encode()), [], n
    with torch.no_grad():
        for step in range(n):
            logits, _ = torch_gpt.forward(w, cfg, torch.tensor([ids[-SEQ:]]), untie=True)
            top = logits[0, -1].topk(2).values
            if upto == n and float(top[0] - top[1]) < 1e-4:
                upto = step
            ids.append(int(logits[0, -1].argmax()))
            want_ids.append(ids[-1])
    failures += check("test_eval_generates_with_the_head",
                      g.returncode == 0 and upto >= 12 and got[:upto] == want_ids[:upto]
                      and len(set(want_ids)) > 4,
                      f"exit {g.returncode}: {got} vs torch's {want_ids} (compared {upto}) "
                      f"{g.stderr[-300:]}")
    return failures


def main():
    mtnlgd, job, ctl, evaluator = sys.argv[1:5]
    failures = 0
    r = random.Random(11)
    tokens = [r.randrange(VOCAB) for _ in range(5 * G * SEQ + 1)]
    with tempfile.TemporaryDirectory(prefix="mtnlg-untie-") as tmp:
        tpath = os.path.join(tmp, "tokens.u16")
        with open(tpath, "wb") as f:
            f.write(array.array("H", tokens).tobytes())
        n, export = torch_checks(mtnlgd, job, tmp, tpath, tokens)
        failures += n
        failures += philox_checks(mtnlgd, job, tmp, tpath)
        failures += checkpoint_checks(mtnlgd, job, ctl, tmp, tpath)
        failures += eval_checks(evaluator, export, tmp)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
