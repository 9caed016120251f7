# Shared helpers for build-guest and build-nested (sourced, not executed).
#
# Both scripts assemble a busybox initramfs from Debian packages, cache their
# work behind a fingerprint of every input, and serialize concurrent runs
# (cargo test runs tests in parallel) with flock.

# Repo root = parent of guest-images/, wherever the checkout lives.
KLPV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KLPV_IMAGES=$KLPV_ROOT/guest-images
KLPV_BUILD=$KLPV_ROOT/build

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Install the Debian packages we use, but only those that are missing, quietly:
# a developer machine already has them, a fresh CI machine gets them here.
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	local out
	if ! out=$(apt-get install -y -qq "${missing[@]}" 2>&1); then
		apt-get update -qq >/dev/null 2>&1 || true
		out=$(apt-get install -y -qq "${missing[@]}" 2>&1) || {
			printf '%s\n' "$out" >&2
			die "apt-get install ${missing[*]} failed"
		}
	fi
}

# Take an exclusive lock for the rest of the script (released at exit).
take_lock() {
	mkdir -p "$KLPV_BUILD"
	exec 9>"$KLPV_BUILD/.$1.lock"
	flock 9
}

# Everything that identifies a set of files, cheaply: path, size, mtime.
# (Used for big binaries; scripts are hashed by content.)
stat_sig() {
	local f
	for f in "$@"; do
		stat -L -c '%n %s %Y' "$f"
	done
}

# The static busybox from busybox-static (the dynamic "busybox" package would
# also provide /bin/busybox, which is useless in an initramfs without libc).
busybox_path() {
	local b
	b=$(dpkg -L busybox-static 2>/dev/null | grep -m1 -E '/s?bin/busybox$') ||
		die "busybox-static is not installed"
	if readelf -l "$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
		die "$b is dynamically linked; need busybox-static"
	fi
	echo "$b"
}

# Skeleton of an initramfs root: busybox with one /bin symlink per applet,
# /sbin -> bin, mount points, and /dev/console so the kernel can give init
# its stdin/stdout/stderr before devtmpfs is mounted.
make_skeleton() {
	local root=$1 bb a
	bb=$(busybox_path)
	mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,etc}
	ln -s bin "$root/sbin"
	cp "$bb" "$root/bin/busybox"
	for a in $("$bb" --list); do
		[ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
	done
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null ||
		log "warning: cannot mknod /dev/console (not root?); init reopens it from devtmpfs"
	chmod 1777 "$root/tmp"
}

# Copy kernel module NAME (searched in MODTREE/kernel) to DEST/NAME.ko,
# decompressing .ko.xz/.ko.zst/.ko.gz (Debian 13 kernels ship .ko.xz; insmod
# in busybox wants a plain .ko).
copy_module() {
	local modtree=$1 name=$2 dest=$3 f
	f=$(find "$modtree/kernel" \( -name "$name.ko" -o -name "$name.ko.*" \) -print -quit)
	[ -n "$f" ] || die "module $name not found under $modtree"
	mkdir -p "$dest"
	case $f in
	*.ko) cp "$f" "$dest/$name.ko" ;;
	*.ko.xz) xz -dc "$f" >"$dest/$name.ko" ;;
	*.ko.zst) ensure_packages zstd; zstd -qdc "$f" >"$dest/$name.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$dest/$name.ko" ;;
	*) die "unknown module compression: $f" ;;
	esac
}

# Every module we ship must have its dependencies shipped too (insmod does not
# resolve them); catches a future kernel that splits a module.
check_module_deps() {
	local dir=$1 m d
	for m in "$dir"/*.ko; do
		for d in $(modinfo -F depends "$m" | tr ',' ' '); do
			[ -e "$dir/$d.ko" ] || die "${m##*/} needs $d.ko, which is not in the image"
		done
	done
}

# Pack ROOT into a gzip'd newc cpio at OUT (atomically). Sorted names, fixed
# owner and mtimes: the same inputs give the same bytes.
pack_cpio() {
	local root=$1 out=$2
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -6n >"$out.tmp"
	mv "$out.tmp" "$out"
}
