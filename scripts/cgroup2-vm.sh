#!/usr/bin/env bash
# Run a command inside a throwaway QEMU VM whose kernel mounts /sys/fs/cgroup as cgroup v2, as most users'
# machines do (this project's own machines are cgroup v1). The VM (virtme-ng) boots Debian's stock kernel on the
# host's own filesystem: read-only, with tmpfs overlays on /etc /usr /var /tmp ..., and read-write only where
# --rwdir says (always the repository, so pytest can write its caches and .lambdabox/).
#
#   scripts/cgroup2-vm.sh [options] -- COMMAND...
#
# COMMAND runs as `bash -c "COMMAND..."` (its words joined with spaces, as ssh does) in the caller's working
# directory, as the caller's user (root here), with stdin from /dev/null, its stdout and stderr merged and
# printed as it runs; the script exits with COMMAND's exit code, read from virtme-ng-init's console line
# `script exited with code N`. Exit 124: the VM ran past --timeout; 125: the VM failed to boot or never reported
# the exit code (the console's tail is printed); 2: usage.
#
# Options (each also an environment variable):
#   --rwdir DIR     also make DIR (same path) writable in the VM; repeatable        (LAMBDABOX_VM_RWDIRS, ':'-separated)
#   --timeout SECS  deadline for the whole VM run, default 1200                   (LAMBDABOX_VM_TIMEOUT)
#   --memory SIZE   guest memory, default 2G                                      (LAMBDABOX_VM_MEMORY)
#   --cpus N        guest CPUs, default 1                                         (LAMBDABOX_VM_CPUS)
#   --kvm           use KVM (default TCG: KVM failed here with an MSR error)      (LAMBDABOX_VM_KVM=1)
#   --console       stream the VM's console (kernel and init messages) to stderr  (LAMBDABOX_VM_CONSOLE=1)
#   --no-network    no network in the VM (default: QEMU's user-mode network, eth0 10.0.2.15, through which pip
#                   reaches the package index as on the host; lambdabox's runtime tests install with pip)
#                                                                                 (LAMBDABOX_VM_NETWORK=0)
#   LAMBDABOX_VM_KERNEL_PACKAGE  the Debian kernel package to boot, default what linux-image-amd64 depends on
#   LAMBDABOX_VM_VIRTME_NG       the pip requirement for virtme-ng, default virtme-ng==1.42 (the version tried)
#
# Owns: <repo>/.lambdabox/vm/ (gitignored): kernel/<package>_<version>/ (the kernel package extracted once,
# with modules.dep made by depmod), venv/ (virtme-ng, only when the project has no .venv), runs/ (one folder
# per run, removed after it), console.log (the last run's console). It installs what it needs when missing:
# Debian's qemu-system-x86, kmod and busybox-static (as root, or through sudo), and virtme-ng from PyPI into
# <repo>/.venv when that exists, else into .lambdabox/vm/venv. Environment passed into the VM: PATH, LANG,
# LC_ALL, TZ, CI, and every LAMBDABOX_* and PYTEST_* variable; nothing else of the caller's.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$repo_root/.lambdabox/vm"
virtme_ng_spec="${LAMBDABOX_VM_VIRTME_NG:-virtme-ng==1.42}"

die() {
    echo "cgroup2-vm: $*" >&2
    exit 125
}

usage() {
    echo "usage: scripts/cgroup2-vm.sh [--rwdir DIR]... [--timeout SECS] [--memory SIZE] [--cpus N] [--kvm] [--console]" \
        "[--no-network] -- COMMAND..." >&2
    exit 2
}

rwdirs=()
if [[ -n "${LAMBDABOX_VM_RWDIRS:-}" ]]; then
    IFS=: read -r -a rwdirs <<<"$LAMBDABOX_VM_RWDIRS"
fi
timeout_s="${LAMBDABOX_VM_TIMEOUT:-1200}"
memory="${LAMBDABOX_VM_MEMORY:-2G}"
cpus="${LAMBDABOX_VM_CPUS:-1}"
kvm="${LAMBDABOX_VM_KVM:-0}"
console="${LAMBDABOX_VM_CONSOLE:-0}"
network="${LAMBDABOX_VM_NETWORK:-1}"
while (($#)); do
    case "$1" in
    --rwdir) (($# >= 2)) || usage; rwdirs+=("$2"); shift 2 ;;
    --rwdir=*) rwdirs+=("${1#--rwdir=}"); shift ;;
    --timeout) (($# >= 2)) || usage; timeout_s="$2"; shift 2 ;;
    --memory) (($# >= 2)) || usage; memory="$2"; shift 2 ;;
    --cpus) (($# >= 2)) || usage; cpus="$2"; shift 2 ;;
    --kvm) kvm=1; shift ;;
    --console) console=1; shift ;;
    --no-network) network=0; shift ;;
    --) shift; break ;;
    *) usage ;;
    esac
done
(($#)) || usage
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || usage
command_line="$*"

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=0
apt_update_once() {
    if ((!apt_updated)); then
        as_root apt-get update -qq
        apt_updated=1
    fi
}

# Debian packages: qemu-system-x86 (the VM), kmod (depmod for the extracted kernel's modules), busybox-static
# (virtme-ng's initramfs, which loads the virtio, 9p and overlay modules before the host filesystem is mounted).
install_debian_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v depmod >/dev/null || [[ -x /sbin/depmod ]] || missing+=(kmod)
    [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" == "install ok installed" ]] ||
        missing+=(busybox-static)
    ((${#missing[@]})) || return 0
    echo "cgroup2-vm: installing Debian packages: ${missing[*]}" >&2
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The kernel: a Debian linux-image package, downloaded and extracted once. Without LAMBDABOX_VM_KERNEL_PACKAGE an
# already extracted one is reused as it is, so that a later run needs neither apt nor the network.
kernel_image=""
find_kernel() {
    local want="${LAMBDABOX_VM_KERNEL_PACKAGE:-}" dir
    for dir in "$state"/kernel/*/; do
        [[ -f "$dir.extracted" ]] || continue
        if [[ -z "$want" || "$(basename "$dir")" == "${want}_"* ]]; then
            kernel_image="$(echo "$dir"boot/vmlinuz-*)"
            [[ -f "$kernel_image" ]] && return 0
        fi
    done
    return 1
}

install_kernel() {
    find_kernel && return 0
    local pkg="${LAMBDABOX_VM_KERNEL_PACKAGE:-}" version tmp kver depmod
    if [[ -z "$pkg" ]]; then
        if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt_update_once; fi
        pkg="$(apt-cache depends linux-image-amd64 | awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-/ {print $2; exit}')"
        [[ -n "$pkg" ]] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-cache depends)"
    fi
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then apt_update_once; fi
    version="$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" {print $2}')"
    [[ -n "$version" && "$version" != "(none)" ]] || die "no candidate version of $pkg (apt-cache policy)"
    echo "cgroup2-vm: downloading and extracting $pkg $version (once)" >&2
    mkdir -p "$state/kernel"
    rm -rf "$state"/kernel/.tmp.*  # left by an interrupted extraction (we hold the setup lock)
    tmp="$(mktemp -d "$state/kernel/.tmp.XXXXXX")"
    # Its stderr is kept aside: as root it warns that _apt cannot write to the folder (harmless).
    if ! (cd "$tmp" && apt-get download -qq "$pkg=$version" 2>download.log); then
        cat "$tmp/download.log" >&2
        die "apt-get download $pkg=$version failed"
    fi
    compgen -G "$tmp/*.deb" >/dev/null || die "apt-get download $pkg=$version gave no .deb"
    dpkg -x "$tmp"/*.deb "$tmp/root"
    rm -f "$tmp"/*.deb "$tmp/download.log"
    kernel_image="$(echo "$tmp"/root/boot/vmlinuz-*)"
    [[ -f "$kernel_image" ]] || die "$pkg has no /boot/vmlinuz-*"
    kver="${kernel_image##*/vmlinuz-}"
    # The package ships no modules.dep (its postinst makes it): vng would otherwise run depmod on every boot.
    depmod="$(command -v depmod || echo /sbin/depmod)"
    "$depmod" -a -b "$tmp/root" "$kver"
    touch "$tmp/root/.extracted"
    rm -rf "$state/kernel/${pkg}_$version"
    mv "$tmp/root" "$state/kernel/${pkg}_$version"
    rmdir "$tmp"
    find_kernel || die "kernel extracted but not found under $state/kernel"
}

venv=""
install_virtme_ng() {
    if [[ -x "$repo_root/.venv/bin/python" ]]; then
        venv="$repo_root/.venv"
    else
        venv="$state/venv"
        if [[ ! -x "$venv/bin/python" ]] && ! python3 -m venv "$venv"; then
            # Debian's own python3 has no ensurepip without python3-venv.
            rm -rf "$venv"
            apt_update_once
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
            python3 -m venv "$venv"
        fi
    fi
    if [[ ! -x "$venv/bin/vng" || ! -x "$venv/bin/virtme-run" ]]; then
        echo "cgroup2-vm: installing $virtme_ng_spec into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --quiet "$virtme_ng_spec" >&2
    fi
}

mkdir -p "$state"
# One setup at a time (two first runs at once would both download the kernel).
exec {lock_fd}>"$state/.setup.lock"
flock "$lock_fd"
install_debian_packages
install_kernel
install_virtme_ng
flock -u "$lock_fd"

# The run's folder: the script the VM runs, the command's output, the console. In the repository, which is
# writable in the VM, so the guest writes the output where the host reads it as it grows.
mkdir -p "$state/runs"
run="$(mktemp -d "$state/runs/run.XXXXXX")"
vm_pid=""
tail_pids=()
# shellcheck disable=SC2317  # reached through the trap
cleanup() {
    [[ -z "$vm_pid" ]] || kill -TERM "$vm_pid" 2>/dev/null || true
    ((${#tail_pids[@]} == 0)) || kill "${tail_pids[@]}" 2>/dev/null || true
    [[ ! -f "$run/console.log" ]] || cp "$run/console.log" "$state/console.log" 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

: >"$run/output"
{
    echo "# written by scripts/cgroup2-vm.sh: run in the VM by virtme-ng-init"
    while IFS= read -r name; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <(compgen -e | grep -E '^(PATH|LANG|LC_ALL|TZ|CI|LAMBDABOX_.*|PYTEST_.*)$' || true)
    # virtme-ng-init starts no udev and no kmod-static-nodes, so /dev/net/tun is missing until the tun module is
    # loaded (a distro boot makes the node and the kernel loads tun on its first open): load it as root, so that
    # slirp4netns works as on users' machines. The modules are the extracted kernel's, linked at /lib/modules.
    cat <<'GUEST'
if [ "$(id -u)" = 0 ] && [ ! -e /dev/net/tun ]; then modprobe tun 2>/dev/null || true; fi
GUEST
    if ((network)); then
        # vng's own DHCP waits for an eth0 that never comes (virtio_net is a module its initramfs does not load),
        # so it runs with --no-dhcp and the interface is set up here, with QEMU user networking's fixed addresses.
        cat <<'GUEST'
modprobe virtio_net 2>/dev/null
if ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2; then
    echo "nameserver 10.0.2.3" >/etc/resolv.conf
fi
GUEST
    fi
    printf 'cd -- %q || { echo "cgroup2-vm: cannot cd to %q in the VM" >>%q; exit 125; }\n' \
        "$PWD" "$PWD" "$run/output"
    printf 'bash -c %q </dev/null >>%q 2>&1\n' "$command_line" "$run/output"
} >"$run/guest.sh"

vng_args=(--run "$kernel_image" --force-9p --memory "$memory" --cpus "$cpus" --verbose --rwdir "$repo_root")
((kvm)) || vng_args+=(--disable-kvm)
((!network)) || vng_args+=(--network user --no-dhcp)
for dir in "${rwdirs[@]}"; do
    [[ -n "$dir" ]] || continue
    [[ -d "$dir" ]] || die "--rwdir $dir: not a directory"
    dir="$(realpath -- "$dir")"
    [[ "$dir" != "$repo_root" ]] || continue
    # vng joins its arguments into a shell command line: a path with spaces or shell characters would break it.
    [[ "$dir" =~ ^[A-Za-z0-9_./+@%-]+$ ]] || die "--rwdir $dir: only letters, digits and _./+@%- are supported"
    vng_args+=(--rwdir "$dir")
done
[[ "$run" =~ ^[A-Za-z0-9_./+@%-]+$ ]] || die "the repository's path $repo_root has characters vng cannot pass"
vng_args+=(--exec "bash $run/guest.sh")

started=$SECONDS
: >"$run/console.log"
# timeout runs vng in a process group of its own and, at the deadline or on TERM from cleanup, signals it whole
# (vng, virtme-run, qemu). The command's output and (with --console) the console are followed as they grow;
# each tail ends once the VM is gone, after a last read.
PATH="$venv/bin:$PATH" timeout --kill-after=30 "$timeout_s" vng "${vng_args[@]}" </dev/null \
    >"$run/console.log" 2>&1 &
vm_pid=$!
tail_pids=()
tail -n +1 -s 0.2 -f --pid="$vm_pid" "$run/output" &
tail_pids+=($!)
if ((console)); then
    tail -n +1 -s 0.2 -f --pid="$vm_pid" "$run/console.log" >&2 &
    tail_pids+=($!)
fi
vm_rc=0
wait "$vm_pid" || vm_rc=$?
vm_pid=""
wait "${tail_pids[@]}" || true
tail_pids=()

code="$(tr -d '\r' <"$run/console.log" | grep -ao 'script exited with code [0-9]*' | tail -n 1 | awk '{print $NF}' || true)"
if [[ -n "$code" ]]; then
    exit "$code"
fi
echo "cgroup2-vm: the VM gave no exit code ('script exited with code N' is missing from its console)" >&2
echo "cgroup2-vm: vng exited $vm_rc after $((SECONDS - started)) s; the console's last lines ($state/console.log):" >&2
tr -d '\r' <"$run/console.log" | tail -n 25 >&2
if ((vm_rc == 124 || vm_rc == 137)); then
    echo "cgroup2-vm: the VM ran past its deadline of $timeout_s s (--timeout / LAMBDABOX_VM_TIMEOUT)" >&2
    exit 124
fi
exit 125
