#!/usr/bin/env bash
# Fuzzes the parsers of hostile input (issue #6) with cargo-fuzz (libFuzzer) on stable Rust: installs
# cargo-fuzz if missing, builds every target once, replays every committed seed and regression input
# of fuzz/corpus/<target>/ once, then fuzzes each target for FUZZ_SECONDS (default 30) seconds.
# Exits non-zero if any input crashes a target; crash inputs are left in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                                  # every target, 30 s each (CI)
#   FUZZ_SECONDS=600 fuzz/run.sh route           # one target, longer
#
# Inputs the fuzzer finds go to fuzz/target/corpus/<target>/ (a scratch corpus kept between local runs),
# never into the committed corpus. A crash found here is fixed in the agent and its input committed
# to fuzz/corpus/<target>/ as a regression case.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz

# `--sanitizer none`: AddressSanitizer needs nightly (-Zsanitizer), and the agent has no unsafe code of
# its own to check; libFuzzer's coverage instrumentation uses stable -C flags only. cargo-fuzz has no
# --locked, so the fetch checks the lock file first: what is fuzzed must be what Cargo.lock says.
cargo fetch --locked --target x86_64-unknown-linux-gnu --quiet
# 16 codegen units: a build several minutes shorter on two cores, for slightly slower runs.
build=(cargo fuzz build --sanitizer none --codegen-units 16)
"${build[@]}"
bin=target/x86_64-unknown-linux-gnu/release

if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

failed=()
for target in "${targets[@]}"; do
  printf -- '--> %s: replaying fuzz/corpus/%s\n' "$target" "$target"
  mkdir -p "corpus/$target" "target/corpus/$target" "artifacts/$target"
  if ! "$bin/$target" -runs=0 -artifact_prefix="artifacts/$target/" "corpus/$target" 2>"target/$target.replay.log"; then
    tail -n 40 "target/$target.replay.log" >&2
    failed+=("$target (corpus replay)")
    continue
  fi
  printf -- '--> %s: fuzzing for %ss\n' "$target" "$seconds"
  if ! "$bin/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$target/" "target/corpus/$target" "corpus/$target" 2>"target/$target.log"; then
    tail -n 40 "target/$target.log" >&2
    failed+=("$target")
    continue
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^#[0-9]+.*DONE' "target/$target.log" | tr '\n' ' '
  echo
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]}" >&2
  echo "crash inputs: fuzz/artifacts/<target>/; reproduce with fuzz/$bin/<target> <file>" >&2
  exit 1
fi
echo "fuzzing passed: ${targets[*]}"
