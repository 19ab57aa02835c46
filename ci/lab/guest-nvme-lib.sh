# Shell helpers shared by kiln's guest scripts of the NVMe lab (busybox ash),
# copied into the payload as kiln-lib.sh and sourced by guest-run.sh and
# guest-verify.sh after /lab/lib.sh.

kiln_failed=0
export KILN_LOG=${KILN_LOG:-info}

# kiln_step NAME CMD...: lab_step that counts failures instead of stopping.
kiln_step() {
  lab_step "$@" || kiln_failed=$((kiln_failed + 1))
}

# kiln_bench_verify SPEC IO_SIZE QD: kiln bench -w verify for KILN_VERIFY_S
# seconds (default 5); passes on exit 0 with zero mismatches.
kiln_bench_verify() {
  _out=$(kiln bench --device "$1" -w verify -o "$2" -q "$3" -t "${KILN_VERIFY_S:-5}" \
    --cores 0 --poll-mode busy 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -eq 0 ] && echo "$_out" | grep -q "verify mismatches 0"
}
