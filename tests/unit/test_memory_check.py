"""mtnlgd checks a job's memory as this engine stores it, before it starts.

usage: test_memory_check.py MTNLGD GPT3_1.3B_BENCH_JOB.json
The engine keeps weights, gradients and Adam in fp32 and, in a bf16 job, a
16-bit working copy of the weights and its blocks' activations in bf16, while
the plan (`mtnlgctl plan`) counts Megatron's 16-bit weight copy.
test_bf16_job_is_checked_as_stored: GPT-3 XL at seq 2048 in micro-batches of
4 (about 36 GB as stored) is refused on a machine with less RAM than that,
with the numbers as stored ("fp32 with bf16 activations", the working copy),
before anything is allocated; test_small_bf16_job_logs_the_working_copy: a
small bf16 job starts and its plan line counts the working copy.
"""
import array
import os
import subprocess
import sys
import tempfile


def check(name, ok, detail):
    print(f"{'ok' if ok else 'FAIL'} {name}: {detail}")
    return 0 if ok else 1


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = os.path.join(tmp, "tokens.u16")
        with open(tokens, "wb") as fh:
            fh.write(array.array("H", range(256)).tobytes() * 200)
        if ram > 36e9:
            print(f"skip test_bf16_job_is_checked_as_stored: {ram / 1e9:.0f} GB RAM holds it")
        else:
            p = subprocess.run([mtnlgd, "--standalone", job, "--set", f"data.path={tokens}"],
                               capture_output=True, text=True, timeout=120)
            failures += check("test_bf16_job_is_checked_as_stored",
                              p.returncode == 2
                              and "as this engine stores a bf16 job (fp32 with bf16 activations"
                              in p.stderr and "weights 5.3 and their 16-bit working copy 2.6, GEMM conversion scratch 0.5, grads 5.3, "
                              "optimizer 10.5" in p.stderr,
                              f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
        p = subprocess.run([mtnlgd, "--standalone", job, "--set", f"data.path={tokens}",
                            "--set", "model.n_layer=2", "--set", "model.n_embd=128",
                            "--set", "model.n_head=4", "--set", "model.seq_len=64",
                            "--set", "parallel.micro_batch=1", "--set", "train.global_batch=2",
                            "--set", "train.steps=1"],
                           capture_output=True, text=True, timeout=120)
        line = [ln for ln in p.stderr.splitlines() if "plan:" in ln]
        failures += check("test_small_bf16_job_logs_the_working_copy",
                          p.returncode == 0 and line and "with the working copy" in line[0]
                          and "fp32 with bf16 activations" in line[0],
                          f"exit {p.returncode}: {line[0] if line else p.stderr[-300:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
