#!/usr/bin/env bash
# Helpers shared by the launchers (sourced, not run).

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# Shell-quote the arguments into one pasteable line: safe words as they are, others in double quotes
# when nothing in them expands there, else in single quotes.
q() {
  local out="" a sq="'\\''" q1="'"
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./:=@,+%^-]* ]]; then
      out+="${out:+ }$a"
    elif [[ $a != *[\"\$\`\\!]* ]]; then
      out+="${out:+ }\"$a\""
    else
      out+="${out:+ }'${a//$q1/$sq}'"
    fi
  done
  printf '%s' "$out"
}
