//go:build linux && rbd

package rbd

/*
#cgo LDFLAGS: -lrbd -lrados
#include <errno.h>
#include <stdlib.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

// librbd calls the progress callback unconditionally, so a resize needs a real one.
static int nst_no_progress(uint64_t offset, uint64_t total, void *arg) {
	return 0;
}

static int nst_grow(rbd_image_t img, uint64_t size) {
	return rbd_resize2(img, size, 0, nst_no_progress, NULL);
}

static int nst_create(rados_ioctx_t io, const char *name, uint64_t size) {
	rbd_image_options_t opts;
	rbd_image_options_create(&opts);
	// exclusive-lock is what fencing is built on; layering is the format-2 baseline.
	// object-map/fast-diff are left out: every first write to an object would also update
	// the map, and nothing here reads it.
	int r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES,
		RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK);
	if (r == 0) {
		r = rbd_create4(io, name, size, opts);
	}
	rbd_image_options_destroy(opts);
	return r;
}

// The lock librbd's exclusive-lock feature takes on the image's header object (cls_lock).
#define NST_RBD_LOCK_NAME "rbd_lock"

static ssize_t nst_list_lockers(rados_ioctx_t io, const char *oid, char *clients, size_t *clients_len,
		char *cookies, size_t *cookies_len, char *addrs, size_t *addrs_len) {
	int exclusive = 0;
	char tag[256];
	size_t tag_len = sizeof(tag);
	return rados_list_lockers(io, oid, NST_RBD_LOCK_NAME, &exclusive, tag, &tag_len,
		clients, clients_len, cookies, cookies_len, addrs, addrs_len);
}

static int nst_break_lock(rados_ioctx_t io, const char *oid, const char *client, const char *cookie) {
	return rados_break_lock(io, oid, NST_RBD_LOCK_NAME, client, cookie);
}

static int nst_has_exclusive_lock(rbd_image_t img) {
	uint64_t f = 0;
	int r = rbd_get_features(img, &f);
	if (r < 0) {
		return r;
	}
	return (f & RBD_FEATURE_EXCLUSIVE_LOCK) != 0;
}
*/
import "C"

import (
	"fmt"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// Compiled reports whether the librbd binding is built in (build with -tags rbd on Linux).
const Compiled = true

// The wrappers below are the whole binding: each returns librados/librbd's negative errno as
// an error (see errno) and nothing else; naming the image or operation is the caller's job.

// errno turns a negative librados/librbd return into an error that wraps the matching
// syscall.Errno, so errors.Is(err, syscall.ENOSPC/EDQUOT/ETIMEDOUT) works for the SCSI layer,
// and wraps ErrFenced as well for -ESHUTDOWN, which is Ceph's -EBLOCKLISTED on Linux.
func errno(ret int64) error {
	e := syscall.Errno(-ret)
	if e == syscall.ESHUTDOWN {
		return fmt.Errorf("%w (%w)", ErrFenced, e)
	}
	return e
}

func cString(s string) *C.char { return C.CString(s) }

func freeCString(p *C.char) { C.free(unsafe.Pointer(p)) }

// rados client

type radosConn struct{ h C.rados_t }

func radosCreate(id string) (radosConn, error) {
	cid := cString(id)
	defer freeCString(cid)
	var h C.rados_t
	if r := C.rados_create(&h, cid); r < 0 {
		return radosConn{}, errno(int64(r))
	}
	return radosConn{h}, nil
}

func (c radosConn) readConf(path string) error {
	var p *C.char
	if path != "" {
		p = cString(path)
		defer freeCString(p)
	}
	if r := C.rados_conf_read_file(c.h, p); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func (c radosConn) set(key, val string) error {
	k, v := cString(key), cString(val)
	defer freeCString(k)
	defer freeCString(v)
	if r := C.rados_conf_set(c.h, k, v); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func (c radosConn) connect() error {
	if r := C.rados_connect(c.h); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func (c radosConn) shutdown() { C.rados_shutdown(c.h) }

// blocklistAdd blocklists the rados client at addr for expire, then waits until this client
// has the osdmap that holds the entry, so every operation it sends from then on tells the
// OSDs about it.
func (c radosConn) blocklistAdd(addr string, expire time.Duration) error {
	a := cString(addr)
	defer freeCString(a)
	if r := C.rados_blocklist_add(c.h, a, C.uint32_t(expire/time.Second)); r < 0 {
		return errno(int64(r))
	}
	if r := C.rados_wait_for_latest_osdmap(c.h); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func (c radosConn) ioctx(pool string) (C.rados_ioctx_t, error) {
	p := cString(pool)
	defer freeCString(p)
	var io C.rados_ioctx_t
	if r := C.rados_ioctx_create(c.h, p, &io); r < 0 {
		return nil, errno(int64(r))
	}
	return io, nil
}

func ioctxDestroy(io C.rados_ioctx_t) { C.rados_ioctx_destroy(io) }

// images

func rbdCreate(io C.rados_ioctx_t, name string, size int64) error {
	n := cString(name)
	defer freeCString(n)
	if r := C.nst_create(io, n, C.uint64_t(size)); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdOpen(io C.rados_ioctx_t, name string, readOnly bool) (C.rbd_image_t, error) {
	n := cString(name)
	defer freeCString(n)
	var h C.rbd_image_t
	var r C.int
	if readOnly {
		r = C.rbd_open_read_only(io, n, &h, nil)
	} else {
		r = C.rbd_open(io, n, &h, nil)
	}
	if r < 0 {
		return nil, errno(int64(r))
	}
	return h, nil
}

func rbdClose(h C.rbd_image_t) error {
	if r := C.rbd_close(h); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdSize(h C.rbd_image_t) (int64, error) {
	var s C.uint64_t
	if r := C.rbd_get_size(h, &s); r < 0 {
		return 0, errno(int64(r))
	}
	return int64(s), nil
}

func rbdHasExclusiveLock(h C.rbd_image_t) (bool, error) {
	r := C.nst_has_exclusive_lock(h)
	if r < 0 {
		return false, errno(int64(r))
	}
	return r == 1, nil
}

func rbdGrow(h C.rbd_image_t, size int64) error {
	if r := C.nst_grow(h, C.uint64_t(size)); r < 0 {
		return errno(int64(r))
	}
	return nil
}

// I/O. p is non-empty; the pointer is only used for the duration of the call.

func rbdRead(h C.rbd_image_t, p []byte, off int64) (int, error) {
	r := C.rbd_read2(h, C.uint64_t(off), C.size_t(len(p)), (*C.char)(unsafe.Pointer(&p[0])), 0)
	if r < 0 {
		return 0, errno(int64(r))
	}
	return int(r), nil
}

// rbdWrite copies p into librbd before the write is dispatched (rbd_disable_zero_copy_writes,
// see Connect), so a write that fails or times out never leaves librbd holding Go memory.
func rbdWrite(h C.rbd_image_t, p []byte, off int64) (int, error) {
	r := C.rbd_write2(h, C.uint64_t(off), C.size_t(len(p)), (*C.char)(unsafe.Pointer(&p[0])), 0)
	if r < 0 {
		return 0, errno(int64(r))
	}
	return len(p), nil
}

func rbdDiscard(h C.rbd_image_t, off, length int64) error {
	if r := C.rbd_discard(h, C.uint64_t(off), C.uint64_t(length)); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdFlush(h C.rbd_image_t) error {
	if r := C.rbd_flush(h); r < 0 {
		return errno(int64(r))
	}
	return nil
}

// identity and metadata

func (c radosConn) fsid() (string, error) {
	var buf [64]C.char
	if r := C.rados_cluster_fsid(c.h, &buf[0], C.size_t(len(buf))); r < 0 {
		return "", errno(int64(r))
	}
	return C.GoString(&buf[0]), nil
}

func ioctxID(io C.rados_ioctx_t) int64 { return int64(C.rados_ioctx_get_id(io)) }

// rbdMetaGet returns the image metadata value of key; ok is false if there is none.
func rbdMetaGet(h C.rbd_image_t, key string) (val string, ok bool, err error) {
	k := cString(key)
	defer freeCString(k)
	n := C.size_t(256)
	for {
		buf := (*C.char)(C.malloc(n))
		if buf == nil {
			return "", false, syscall.ENOMEM
		}
		got := n
		r := C.rbd_metadata_get(h, k, buf, &got)
		switch {
		case r == -C.ERANGE && got > n:
			C.free(unsafe.Pointer(buf))
			n = got
			continue
		case r == -C.ENOENT:
			C.free(unsafe.Pointer(buf))
			return "", false, nil
		case r < 0:
			C.free(unsafe.Pointer(buf))
			return "", false, errno(int64(r))
		}
		val = C.GoString(buf)
		C.free(unsafe.Pointer(buf))
		return val, true, nil
	}
}

// rbdMetaPrefix returns the image metadata whose keys begin with prefix, in one round trip; ok
// is false if there were more than it asked for (the caller then reads keys one by one).
func rbdMetaPrefix(h C.rbd_image_t, prefix string) (kv map[string]string, ok bool, err error) {
	const most = 32
	start := cString(prefix) // listing starts after this key; ours all have more after it
	defer freeCString(start)
	kn, vn := C.size_t(1024), C.size_t(8192)
	for {
		kb, vb := (*C.char)(C.malloc(kn)), (*C.char)(C.malloc(vn))
		if kb == nil || vb == nil {
			C.free(unsafe.Pointer(kb))
			C.free(unsafe.Pointer(vb))
			return nil, false, syscall.ENOMEM
		}
		gk, gv := kn, vn
		r := C.rbd_metadata_list(h, start, most, kb, &gk, vb, &gv)
		if r == -C.ERANGE {
			C.free(unsafe.Pointer(kb))
			C.free(unsafe.Pointer(vb))
			kn, vn = max(gk, 2*kn), max(gv, 2*vn)
			continue
		}
		if r < 0 {
			C.free(unsafe.Pointer(kb))
			C.free(unsafe.Pointer(vb))
			return nil, false, errno(int64(r))
		}
		keys := C.GoBytes(unsafe.Pointer(kb), C.int(gk))
		vals := C.GoBytes(unsafe.Pointer(vb), C.int(gv))
		C.free(unsafe.Pointer(kb))
		C.free(unsafe.Pointer(vb))
		kv = map[string]string{}
		ks := strings.Split(strings.TrimRight(string(keys), "\x00"), "\x00")
		vs := strings.Split(strings.TrimRight(string(vals), "\x00"), "\x00")
		n := 0
		for i, k := range ks {
			if k == "" {
				continue
			}
			n++
			if !strings.HasPrefix(k, prefix) {
				return kv, true, nil // past our keys: that is all of them
			}
			if i >= len(vs) {
				return nil, false, nil
			}
			kv[k] = vs[i]
		}
		return kv, n < most, nil
	}
}

func rbdMetaSet(h C.rbd_image_t, key, val string) error {
	k, v := cString(key), cString(val)
	defer freeCString(k)
	defer freeCString(v)
	if r := C.rbd_metadata_set(h, k, v); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdMetaRemove(h C.rbd_image_t, key string) error {
	k := cString(key)
	defer freeCString(k)
	if r := C.rbd_metadata_remove(h, k); r < 0 && r != -C.ENOENT {
		return errno(int64(r))
	}
	return nil
}

// exclusive lock

// rbdHeader is the name of the image's header object, which carries its exclusive lock: from
// the handle's cached id, no round trip.
func rbdHeader(h C.rbd_image_t) (string, error) {
	var buf [64]C.char
	if r := C.rbd_get_id(h, &buf[0], C.size_t(len(buf))); r < 0 {
		return "", errno(int64(r))
	}
	return "rbd_header." + C.GoString(&buf[0]), nil
}

// locker is one holder of an image's exclusive lock, as cls_lock records it.
type locker struct {
	client string // entity name, e.g. client.4123
	cookie string // "auto <handle>" for librbd's managed lock
	addr   string // the holder's rados client address: what the blocklist names
}

// radosLockers lists the holders of the exclusive lock on header object oid: one round trip
// (rbd_lock_get_owners costs the same, but breaking by owner address then costs four more).
func radosLockers(io C.rados_ioctx_t, oid string) ([]locker, error) {
	o := cString(oid)
	defer freeCString(o)
	n := C.size_t(256)
	for {
		cl, ck, ad := (*C.char)(C.malloc(n)), (*C.char)(C.malloc(n)), (*C.char)(C.malloc(n))
		free := func() {
			C.free(unsafe.Pointer(cl))
			C.free(unsafe.Pointer(ck))
			C.free(unsafe.Pointer(ad))
		}
		if cl == nil || ck == nil || ad == nil {
			free()
			return nil, syscall.ENOMEM
		}
		cln, ckn, adn := n, n, n
		r := C.nst_list_lockers(io, o, cl, &cln, ck, &ckn, ad, &adn)
		if r == -C.ERANGE {
			free()
			n = max(2*n, cln, ckn, adn)
			continue
		}
		if r == -C.ENOENT || r == 0 {
			free()
			return nil, nil
		}
		if r < 0 {
			free()
			return nil, errno(int64(r))
		}
		split := func(p *C.char, l C.size_t) []string {
			return strings.Split(strings.TrimRight(string(C.GoBytes(unsafe.Pointer(p), C.int(l))), "\x00"), "\x00")
		}
		clients, cookies, addrs := split(cl, cln), split(ck, ckn), split(ad, adn)
		free()
		if len(clients) != int(r) || len(cookies) != int(r) || len(addrs) != int(r) {
			return nil, fmt.Errorf("lockers of %s: %d lockers but %d clients, %d cookies, %d addresses", oid, r, len(clients), len(cookies), len(addrs))
		}
		out := make([]locker, r)
		for i := range out {
			// cls_lock prints the address with its messenger type ("v1:127.0.0.1:0/123");
			// without it, it is what librbd reports as the owner and what the monitors
			// blocklist (they ignore the type).
			addr := addrs[i]
			for _, t := range []string{"v1:", "v2:", "any:"} {
				addr = strings.TrimPrefix(addr, t)
			}
			out[i] = locker{client: clients[i], cookie: cookies[i], addr: addr}
		}
		return out, nil
	}
}

// radosBreakLock removes one holder's exclusive lock on header object oid: one round trip.
// -ENOENT: it does not hold it (any more).
func radosBreakLock(io C.rados_ioctx_t, oid string, l locker) error {
	o, cl, ck := cString(oid), cString(l.client), cString(l.cookie)
	defer freeCString(o)
	defer freeCString(cl)
	defer freeCString(ck)
	if r := C.nst_break_lock(io, o, cl, ck); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdLockAcquire(h C.rbd_image_t) error {
	if r := C.rbd_lock_acquire(h, C.RBD_LOCK_MODE_EXCLUSIVE); r < 0 {
		return errno(int64(r))
	}
	return nil
}

func rbdLockRelease(h C.rbd_image_t) error {
	if r := C.rbd_lock_release(h); r < 0 {
		return errno(int64(r))
	}
	return nil
}
