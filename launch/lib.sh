# Shared by the launchers (sourced, not run): their --help text, and shell quoting for printed
# and remote commands.

# The comment block at the top of script $1 (after the #! line, up to the first line that is
# not a comment), without the leading "# ": the launchers' --help. Read to the block's end
# rather than a fixed line range, which went stale (printing code) whenever a header grew.
header_help() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$1"; }

# $1, quoted for a shell only when it needs it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# All arguments, each quoted, joined by spaces (nothing for no arguments).
quote_all() {
  local out="" arg
  for arg in "$@"; do out+="$(quote "$arg") "; done
  printf '%s' "${out% }"
}
