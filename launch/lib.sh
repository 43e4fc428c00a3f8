# Shared by the launchers (sourced, not run): shell quoting for printed and remote commands.

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
