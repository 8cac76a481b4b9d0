"""A ``search:`` runs as ordinary jobs, end to end through the CLI, on a tiny GGUF model and real text: validate says
the plan; probes, uniform and mixed candidates run; every candidate's artifact holds the per-layer formats its row
records, within the target; the pick is the best measured candidate that meets the target, and it loads in its own
library's loader; a resubmit redoes nothing."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from qfarm.farm.store import TERMINAL
from tests.cli import qfarm, results, submitted_id
from tests.tiny import corpus_of, make_spm_gguf

pytestmark = pytest.mark.e2e

TARGET = 5.0


def test_a_search_runs_on_the_farm_and_picks_within_its_target(cli_env, shared_data, tmp_path, store, ray_head):
    gguf = make_spm_gguf(tmp_path / "model", corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 400),
                         family="llama", prefix=True)
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "wikitext2" / "wiki.test.raw").read_text()[:30_000])
    spec = tmp_path / "search.yaml"
    spec.write_text(f"""\
name: e2e-search
model: {gguf}
eval:
  perplexity: {{dataset: {text}, seq_len: 128, max_windows: 4}}
  speed: null
search:
  target: {{bits_per_weight: {TARGET}}}
  objective: kl_div
  space:
    - {{method: rtn, bits: [3, 4, 8], group_size: [32, 64], mixed: true}}
    - {{method: gguf, gguf_type: [Q4_0, Q5_0, Q8_0], mixed: true}}
    - {{method: gptq, bits: [4, 8], group_size: [64], mixed: true,
       calibration: {{dataset: {text}, samples: 8, seq_len: 64, share: true}}}}
  budget: {{jobs: 7}}
  probe: {{windows: 2, seq_len: 64, jobs: 2}}
""")
    checked = qfarm(cli_env, "validate", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    said = checked.stdout + checked.stderr
    assert re.search(r"uniform candidates that fit: \d+ of 11", said), said
    assert "planned: 2 probe job(s)" in said and "full evaluation(s) (budget 7)" in said, said

    # stopped half-way, once the probes are done: the retry runs what was left and redoes nothing
    out = qfarm(cli_env, "submit", str(spec))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = submitted_id(out.stdout)
    deadline = time.monotonic() + 600
    while True:
        jobs = store.sweep_jobs(sweep)
        probes = [j for j in jobs if j.job.kind == "probe"]
        if probes and all(j.status == "succeeded" for j in probes):
            break
        assert time.monotonic() < deadline and not any(j.status == "failed" for j in jobs), \
            [(j.job.label, j.status, j.error) for j in jobs]
        time.sleep(0.3)
    assert qfarm(cli_env, "cancel", sweep, "--grace", "0").returncode == 0
    probes_done = {j.id: j.finished_at for j in probes}
    while not all(j.status in TERMINAL for j in store.sweep_jobs(sweep)):
        time.sleep(0.3)
    stopped = [j for j in store.sweep_jobs(sweep) if j.status == "cancelled"]
    assert stopped, "every job had finished before the cancel: nothing was left to resume"
    again = qfarm(cli_env, "retry", sweep, "--wait")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = results(cli_env, sweep)
    assert {r["job_id"]: r["finished_at"] for r in rows if r["job_id"] in probes_done} == probes_done
    by_role: dict[str, list[dict]] = {}
    for r in rows:
        assert r["status"] == "succeeded", (r["label"], r.get("error"))
        by_role.setdefault(r.get("search_role"), []).append(r)
    assert len(by_role["probe"]) == 2 and sum(r["probe_layers"] for r in by_role["probe"]) == 14  # 2 blocks × 7
    candidates = by_role["candidate"] + by_role["uniform"]
    assert 3 <= len(by_role["candidate"]) and len(candidates) <= 7  # the budget
    # a GPTQ mix solves from the shared capture and reads the same probes
    gptq = [r for r in by_role["candidate"] if r["method"] == "gptq"]
    assert gptq and all(r["calib_source"] == "shared capture" for r in gptq)

    for r in by_role["uniform"]:  # every candidate's row says each layer's format, uniform ones too
        assert len({k: v for k, v in r["layer_formats"].items() if r["method"] != "gguf" or k.startswith("blk.")}) == 14
    for r in by_role["candidate"]:
        formats = r["layer_formats"]
        assert r["bits_per_weight"] <= TARGET * 1.002, r
        # the predicted size is the stored one: the allocation's accounting is the artifact's
        assert r["bits_per_weight"] == pytest.approx(r["search_predicted_bits_per_weight"], rel=0.01), r
        assert r["search_predicted_kl"] is not None and r["kl_div"] is not None  # predicted beside measured
        if r["method"] == "gguf":
            blocks = {k: v for k, v in formats.items() if k.startswith("blk.")}
            assert len(blocks) == 14 and r["tensor_types"], r
        else:
            assert len(formats) == 14 and set(formats.values()) <= {"3b g32", "3b g64", "4b g32", "4b g64", "8b g32",
                                                                    "8b g64"}
            config = json.loads((Path(r["artifact"]) / "config.json").read_text())["quantization_config"]
            assert len(config["config_groups"]) == len(set(formats.values()))  # one config group per format used
    assert any(len(set(r["layer_formats"].values())) > 1 for r in by_role["candidate"])  # a real mix somewhere

    picks = [r for r in candidates if r["search_pick"]]
    assert len(picks) == 1
    pick = picks[0]
    eligible = [r for r in candidates if r["bits_per_weight"] <= TARGET * 1.002]
    assert pick["kl_div"] == min(r["kl_div"] for r in eligible)
    table = qfarm(cli_env, "results", sweep)
    assert table.returncode == 0 and "pick" in table.stdout and "candidate" in table.stdout
    report = tmp_path / "report.html"
    assert qfarm(cli_env, "report", sweep, "-o", str(report)).returncode == 0
    page = report.read_text()
    assert 'id="fig-search"' in page and 'id="pick"' in page and pick["label"].replace("≤", "") in page.replace("≤", "")
    path = page.split('id="search-path"', 1)[1].split("</table>", 1)[0]  # every search job, the pick starred
    assert path.count("<tr>") + path.count("<tr ") - 1 == sum(1 for r in rows if r.get("search_role")) and "★" in path

    # the pick loads in its own library's loader
    if pick["method"] == "gguf":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(next(Path(pick["artifact"]).glob("*.gguf"))), n_ctx=64, verbose=False)
        assert llm.n_vocab() > 0
        llm.close()
    else:
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(pick["artifact"]) is not None

    # the mixed GGUF and the mixed RTN as plain jobs (their rows' fragments: tensor_types, layer_rules; no probes
    # needed) make the same models: the same format for every layer, the same KL
    import yaml

    mixed_gguf = next(r for r in by_role["candidate"] if r["method"] == "gguf")
    mixed_rtn = next(r for r in by_role["candidate"] if r["method"] == "rtn")
    job = yaml.safe_load(mixed_gguf["search_fragment"])
    assert "mixed" not in job and job["tensor_types"] == mixed_gguf["tensor_types"]
    # quantized with the probes' importance matrix, kept beside the file for the plain job (and llama-quantize)
    assert mixed_gguf["gguf_imatrix"]["tensors"] == 14 and job["imatrix"] == mixed_gguf["gguf_imatrix"]["file"]
    assert (Path(cli_env["QFARM_OUTPUT_ROOT"]) / job["imatrix"]).is_file()
    unweighted = {k: v for k, v in job.items() if k != "imatrix"}
    job = yaml.safe_load(mixed_rtn["search_fragment"])
    assert "mixed" not in job and job["layer_rules"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(spec.read_text().split("search:")[0] + "jobs:\n  - " + mixed_gguf["search_fragment"]
                     + "\n  - " + mixed_rtn["search_fragment"] + "\n  - " + json.dumps(unweighted) + "\n")
    out = qfarm(cli_env, "submit", str(plain), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plain_all = results(cli_env, submitted_id(out.stdout))
    plain_rows = {"gguf": next(r for r in plain_all if r["method"] == "gguf" and r.get("gguf_imatrix")),
                  "rtn": next(r for r in plain_all if r["method"] == "rtn")}
    # the same rules without the importance matrix make another file: the imatrix is applied, not just recorded
    (bare,) = [r for r in plain_all if r["method"] == "gguf" and r.get("gguf_imatrix") is None]
    assert bare["layer_formats"] == mixed_gguf["layer_formats"] and bare["kl_div"] != pytest.approx(mixed_gguf["kl_div"])
    for before in (mixed_gguf, mixed_rtn):
        again = plain_rows[before["method"]]
        assert again["status"] == "succeeded" and again["search_role"] is None, again
        assert again["layer_formats"] == before["layer_formats"]
        assert again["kl_div"] == pytest.approx(before["kl_div"], rel=1e-6)
        assert again["bits_per_weight"] == pytest.approx(before["bits_per_weight"])

    # a resubmit reuses every probe and candidate: nothing runs again
    again = qfarm(cli_env, "submit", str(spec), "--wait")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert submitted_id(again.stdout) == sweep
    for before, after in zip(sorted(rows, key=lambda r: r["job_id"]),
                             sorted(results(cli_env, sweep), key=lambda r: r["job_id"])):
        assert (after["attempts"], after["finished_at"]) == (before["attempts"], before["finished_at"])

    # the same space under a size target (MB on disk): the probes are the same jobs (reused), the candidates are
    # planned from the size less what each library stores besides the layers, and the pick meets it as measured
    sizes = sorted(r["size_mb"] for r in candidates)
    size = round((sizes[0] + sizes[-1]) / 2, 2)
    by_size = tmp_path / "by-size.yaml"
    by_size.write_text(spec.read_text().replace(f"target: {{bits_per_weight: {TARGET}}}", f"target: {{size_mb: {size}}}")
                       .replace("name: e2e-search", "name: e2e-search-size"))
    said = qfarm(cli_env, "validate", str(by_size))
    assert said.returncode == 0 and f"at ≤ {size:g} MB on disk" in said.stdout, said.stdout + said.stderr
    assert "one of the embedding table and head" in said.stdout, said.stdout
    out = qfarm(cli_env, "submit", str(by_size), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sized = results(cli_env, submitted_id(out.stdout))
    assert all(r["status"] == "succeeded" for r in sized), [(r["label"], r.get("error")) for r in sized]
    # the layers' probes are the bits-per-weight search's; one more prices the GGUF's tables (this Llama's embedding
    # and its untied head), which its mixes allocate beside the layers: the file holds the types they chose
    layer_probes = {r["job_id"] for r in by_role["probe"]}
    (tables,) = [r for r in sized if r["search_role"] == "probe" and r["job_id"] not in layer_probes]
    assert layer_probes < {r["job_id"] for r in sized if r["search_role"] == "probe"} and tables["probe_tables"] == 2
    mixes = [r for r in sized if r["search_role"] == "candidate" and r["method"] == "gguf"]
    assert mixes and all(set(r["search_table_formats"]) == {"token_embd.weight", "output.weight"} for r in mixes)
    for r in mixes:
        assert {t: r["layer_formats"][t] for t in r["search_table_formats"]} == r["search_table_formats"]
        assert r["size_mb"] <= size
    assert all(r.get("search_table_formats") is None for r in sized if r["method"] != "gguf")  # kept in float there
    (picked,) = [r for r in sized if r.get("search_pick")]
    assert picked["search_target"] == {"size_mb": size} and picked["size_mb"] <= size
    fitting = [r for r in sized if r["search_role"] in ("uniform", "candidate") and r["size_mb"] <= size]
    assert picked["kl_div"] == min(r["kl_div"] for r in fitting)

    # successive halving over two rungs: every candidate screened on 1 window, the best 3 of those within the target
    # again on 2 (rung jobs), the best 2 of those in full, each on its candidate's own artifact; the probes are the
    # plain search's (reused)
    halved = tmp_path / "halved.yaml"
    halved.write_text(spec.read_text().replace("name: e2e-search", "name: e2e-search-halving")
                      + "  halving: {windows: [1, 2], keep: [3, 2]}\n")
    said = qfarm(cli_env, "validate", str(halved))
    assert said.returncode == 0 and "screened on 1 window(s)" in said.stdout, said.stdout + said.stderr
    assert "the best 3 of them again on 2 window(s) (rung 2 jobs)" in said.stdout, said.stdout
    out = qfarm(cli_env, "submit", str(halved), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    halving = results(cli_env, submitted_id(out.stdout))
    assert {r["job_id"] for r in halving if r["search_role"] == "probe"} == {r["job_id"] for r in by_role["probe"]}
    screens = [r for r in halving if r["search_role"] in ("uniform", "candidate")]
    rank = lambda r: r["search_screen"]["rank"]  # noqa: E731
    rungs = sorted((r for r in halving if r["search_role"] == "rung"), key=rank)
    finals = sorted((r for r in halving if r["search_role"] == "final"), key=rank)
    assert len(rungs) == 3 and len(finals) == 2, [(r["label"], r["error"]) for r in rungs + finals]
    assert all(r["status"] == "succeeded" for r in rungs + finals), [(r["label"], r["error"]) for r in rungs + finals]
    assert all(r["ppl_windows"] == 1 for r in screens) and all(r["ppl_windows"] == 2 for r in rungs)
    # their reference figures are the first windows of those the reference job wrote: none computed its own
    assert all(r["ref_cache"] in ("shared", "memory") for r in screens + rungs), [(r["label"], r["ref_cache"]) for r in screens + rungs]
    assert all(r["ppl_windows"] == 4 for r in finals)
    order = lambda rows: sorted((r for r in rows if r["status"] == "succeeded" and r["bits_per_weight"] <= TARGET * 1.002),  # noqa: E731
                                key=lambda r: (r["kl_div"], r["bits_per_weight"], r["job_id"]))
    for rung, screen in zip(rungs, order(screens)):  # rank k: the k-th best screen; its own artifact, its own facts
        assert rung["search_final_of"] == screen["job_id"] and rung["artifact"] == screen["artifact"]
        assert rung["search_screen"]["kl_div"] == screen["kl_div"] and screen["label"] in rung["label"]
        assert rung["search_pick"] is False
    for final, rung in zip(finals, order(rungs)):  # rank k: the k-th best rung job, standing for its candidate
        screen = next(r for r in screens if r["job_id"] == rung["search_final_of"])
        assert final["search_final_of"] == screen["job_id"] and final["artifact"] == screen["artifact"]
        assert final["search_final_label"] == screen["label"] and final["search_fragment"] == screen["search_fragment"]
        assert final["layer_formats"] == screen["layer_formats"] and final["method"] == screen["method"]
        assert final["bits_per_weight"] == screen["bits_per_weight"] and final["size_mb"] == screen["size_mb"]
        assert final["search_screen"]["kl_div"] == rung["kl_div"]  # what the rung before measured, on 2 windows
        assert final["search_screen"]["before"] == rung["search_screen"]  # and the screen before it, on 1
        full = next(r for r in candidates if r["label"] == screen["label"])  # the plain search's row, in full
        assert final["layer_formats"] == full["layer_formats"]
        assert final["kl_div"] == pytest.approx(full["kl_div"], rel=1e-4)  # the same model, measured the same way
    (picked,) = [r for r in halving if r.get("search_pick")]
    assert picked["search_role"] == "final" and picked["kl_div"] == min(r["kl_div"] for r in finals)
