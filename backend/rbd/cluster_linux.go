//go:build linux && rbd

package rbd

/*
#include <rados/librados.h>
#include <rbd/librbd.h>
*/
import "C"

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"nstarget/backend"
)

// Cluster is one rados client connected to one pool. A node should have exactly one: the
// blocklist entry that fences a node names its rados client, so every image a node serves
// must go through the same client for a fence to stop all of them. Once fenced, a Cluster
// stays fenced (every call wraps ErrFenced); a node that is to serve again must Close it and
// Connect a new client, which is not on the blocklist.
type Cluster struct {
	pool string
	conn radosConn
	io   C.rados_ioctx_t
	id   backend.PoolID // derived from the cluster's fsid and the pool's id: the same on every node

	// fenced is set by the first operation that fails with ErrFenced. The blocklist names
	// the whole client, so from then on every image of this Cluster is dead: I/O fails at
	// once, without asking the cluster, so nothing can slip through should the blocklist
	// entry expire while this process lives on.
	fenced atomic.Bool

	mu      sync.Mutex
	open    map[string]*image        // by name; an image is opened once per Cluster
	pending map[string]chan struct{} // names being opened; closed when that is done
	fences  map[string]*fence        // by holder address: the blocklistings of this client
	// The hot standby (Prepare): wanted holds the names this client stands by for, idle an
	// open handle of each of them that nobody uses and that does not hold the lock. Open of
	// such a name takes the idle handle and only locks it: a takeover then skips the dozen
	// round trips of opening the image. The last Close of a wanted image parks its handle
	// here again (lock released) rather than closing it.
	wanted map[string]bool
	idle   map[string]C.rbd_image_t
	closed bool
	// opening counts opens in progress outside mu (they talk to the cluster: a takeover
	// opens many images at once); Close waits for them before it destroys the io context.
	opening sync.WaitGroup
}

// Connect creates the rados client, connects it (within the op timeout) and opens the pool.
func Connect(cfg Config) (*Cluster, error) {
	if cfg.Pool == "" {
		return nil, errors.New("rbd: connect: empty pool name")
	}
	id := cfg.ClientID
	if id == "" {
		id = "admin"
	}
	id = strings.TrimPrefix(id, "client.")
	timeout := cfg.OpTimeout
	if timeout <= 0 {
		timeout = DefaultOpTimeout
	}
	// Ceph takes whole seconds; rounding up never makes the bound shorter than asked for.
	secs := strconv.FormatInt(int64(math.Ceil(timeout.Seconds())), 10)

	conn, err := radosCreate(id)
	if err != nil {
		return nil, fmt.Errorf("rbd: connect as client.%s: create: %w", id, err)
	}
	if err := conn.readConf(cfg.ConfPath); err != nil {
		conn.shutdown()
		return nil, fmt.Errorf("rbd: connect: read conf %q: %w", cfg.ConfPath, err)
	}
	settings := [][2]string{
		// The SCSI layer acknowledges a write only when it is on the OSDs; a client cache
		// would acknowledge earlier and lose the write on a fence.
		{"rbd_cache", "false"},
		// Without these an unreachable monitor or a full/stuck OSD blocks forever.
		{"client_mount_timeout", secs},
		{"rados_mon_op_timeout", secs},
		{"rados_osd_op_timeout", secs},
		// Every client in the process gets its own admin socket: two clients asking for the
		// same path make the second one stall.
		{"admin_socket", "$run_dir/$cluster-$name.$pid.$cctid.asok"},
		// librbd copies each write buffer once (its default). Zero-copy writes were measured
		// to hang with librbd 16.2.15: a write failing with -EBLOCKLISTED after a fence keeps
		// its completion blocked on the user buffer, which is never released, so the caller
		// would wait forever.
		{"rbd_disable_zero_copy_writes", "true"},
		// Unmap promises zeros for the whole range; by default librbd silently skips the
		// parts of a discard that do not cover whole 64 KiB granules.
		{"rbd_skip_partial_discard", "false"},
		// Fencing is blocklisting the holder, then breaking its lock; without the blocklist
		// the old owner would keep writing. lock blocklists each holder itself, once for
		// all of that holder's images (see Cluster.blocklist), so librbd's own blocklist on
		// break is off: it would ask the monitors once per image, and a takeover of a dead
		// node's 300 images would make 300 osdmap epochs that every OSD and client must
		// process before the images open.
		{"rbd_blocklist_on_break_lock", "false"},
	}
	for _, kv := range settings {
		if err := conn.set(kv[0], kv[1]); err != nil {
			conn.shutdown()
			return nil, fmt.Errorf("rbd: connect: set %s=%s: %w", kv[0], kv[1], err)
		}
	}
	if err := conn.connect(); err != nil {
		conn.shutdown()
		return nil, fmt.Errorf("rbd: connect as client.%s (conf %q): %w", id, cfg.ConfPath, err)
	}
	io, err := conn.ioctx(cfg.Pool)
	if err != nil {
		conn.shutdown()
		return nil, fmt.Errorf("rbd: open pool %s: %w", cfg.Pool, err)
	}
	fsid, err := conn.fsid()
	if err != nil {
		ioctxDestroy(io)
		conn.shutdown()
		return nil, fmt.Errorf("rbd: cluster fsid: %w", err)
	}
	return &Cluster{pool: cfg.Pool, conn: conn, io: io, id: poolID(fsid, ioctxID(io)), open: make(map[string]*image), pending: make(map[string]chan struct{}), fences: make(map[string]*fence),
		wanted: make(map[string]bool), idle: make(map[string]C.rbd_image_t)}, nil
}

// poolID is the identity the SCSI layer derives device identifiers from (backend.Identified).
// Every node must present an image as the same disk, so it cannot be random like a file
// pool's: it is a hash of the cluster's fsid and the pool's id (not its name, which can be
// renamed), shaped as an RFC 9562 version 8 (custom) UUID.
func poolID(fsid string, pool int64) backend.PoolID {
	sum := sha256.Sum256(fmt.Appendf(nil, "nstarget-rbd-pool:%s:%d", fsid, pool))
	var id backend.PoolID
	copy(id[:], sum[:])
	id[6] = id[6]&0x0F | 0x80
	id[8] = id[8]&0x3F | 0x80
	return id
}

// Close closes every image still open (releasing their locks cleanly) and the rados client.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.opening.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for name, img := range c.open {
		errs = append(errs, img.close())
		delete(c.open, name)
	}
	for name, h := range c.idle {
		if err := rbdClose(h); err != nil && !c.fenced.Load() {
			errs = append(errs, fmt.Errorf("rbd: image %s: close standby handle: %w", name, err))
		}
		delete(c.idle, name)
	}
	ioctxDestroy(c.io)
	c.conn.shutdown()
	return errors.Join(errs...)
}

func checkArgs(name string, size int64) error {
	if err := backend.ValidName(name); err != nil {
		return fmt.Errorf("rbd: %w", err)
	}
	if size <= 0 {
		return fmt.Errorf("rbd: image %s: size %d must be positive", name, size)
	}
	return nil
}

// Check validates that name/size could be opened, without creating, growing or locking
// anything: a bad name, or an existing image larger than size (backend.ErrShrink), is an error
// naming the image. A missing image is fine (Open creates it).
func (c *Cluster) Check(name string, size int64) error {
	if err := checkArgs(name, size); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("rbd: image %s: cluster %w", name, backend.ErrClosed)
	}
	cur := int64(-1)
	if img, ok := c.open[name]; ok {
		cur = img.size.Load()
	} else {
		// Read-only: no watch, no lock, nothing another node could notice.
		h, err := rbdOpen(c.io, name, true)
		if errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("rbd: image %s: open read-only: %w", name, err)
		}
		cur, err = rbdSize(h)
		if cerr := rbdClose(h); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("rbd: image %s: size: %w", name, err)
		}
	}
	if cur > size {
		return fmt.Errorf("rbd: image %s: existing size %d > configured %d: %w", name, cur, size, backend.ErrShrink)
	}
	return nil
}

// Open returns the image called name, locked by this client: it is created at size if
// missing and grown if smaller; a larger image is refused (backend.ErrShrink). If another
// client holds the lock, Open fails with ErrLocked naming the holder, unless opts.Fence is
// set: then the holder is blocklisted and the lock taken over. Opening a name this Cluster
// already has open shares that image (reference counted; each Image must be closed).
func (c *Cluster) Open(name string, size int64, opts OpenOptions) (*Image, error) {
	if err := checkArgs(name, size); err != nil {
		return nil, err
	}
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, fmt.Errorf("rbd: image %s: cluster %w", name, backend.ErrClosed)
		}
		if c.fenced.Load() {
			c.mu.Unlock()
			return nil, fmt.Errorf("rbd: image %s: this client was fenced; connect a new one: %w", name, ErrFenced)
		}
		if img, ok := c.open[name]; ok {
			defer c.mu.Unlock()
			if err := img.grow(size); err != nil {
				return nil, err
			}
			img.refs++
			return &Image{img: img}, nil
		}
		if done, busy := c.pending[name]; busy {
			// Someone is opening it: wait, then share what they opened (or try ourselves).
			c.mu.Unlock()
			<-done
			continue
		}
		done := make(chan struct{})
		c.pending[name] = done
		c.opening.Add(1)
		h, standby := c.idle[name]
		delete(c.idle, name)
		c.mu.Unlock()

		// Outside mu: opens of different images (a takeover of many tenants) overlap.
		img, err := c.openImage(name, size, opts, h)
		if standby && errors.Is(err, syscall.ENOENT) {
			// The standby handle outlived its image (deleted, perhaps made again under
			// the same name): open whatever bears the name now.
			img, err = c.openImage(name, size, opts, nil)
		}
		c.mu.Lock()
		delete(c.pending, name)
		close(done)
		switch {
		case err == nil && c.closed:
			img.close()
			err = fmt.Errorf("rbd: image %s: cluster %w", name, backend.ErrClosed)
		case err == nil:
			c.open[name] = img
		case errors.Is(err, ErrFenced):
			c.fenced.Store(true)
		}
		c.mu.Unlock()
		c.opening.Done()
		if err != nil {
			return nil, err
		}
		return &Image{img: img}, nil
	}
}

// openImage locks and sizes an image handle: standby if it is not nil (a handle Prepare
// opened, unlocked), else a new one. Open makes sure that no other open of the same name runs
// at the same time. The handle is closed if it fails.
func (c *Cluster) openImage(name string, size int64, opts OpenOptions, standby C.rbd_image_t) (*image, error) {
	start := time.Now()
	h, err := standby, error(nil)
	if standby == nil {
		h, err = rbdOpen(c.io, name, false)
	}
	if standby == nil && errors.Is(err, syscall.ENOENT) {
		err = rbdCreate(c.io, name, size)
		if err != nil && !errors.Is(err, syscall.EEXIST) { // EEXIST: another node won the race
			return nil, fmt.Errorf("rbd: image %s: create with size %d in pool %s: %w", name, size, c.pool, err)
		}
		h, err = rbdOpen(c.io, name, false)
	}
	if err != nil {
		return nil, fmt.Errorf("rbd: image %s: open in pool %s: %w", name, c.pool, err)
	}
	ok := false
	locked := false
	defer func() {
		if ok {
			return
		}
		if locked {
			_ = rbdLockRelease(h) // best effort: the open failed anyway
		}
		_ = rbdClose(h)
	}()

	hasLock, err := rbdHasExclusiveLock(h)
	if err != nil {
		return nil, fmt.Errorf("rbd: image %s: features: %w", name, err)
	}
	if !hasLock {
		return nil, fmt.Errorf("rbd: image %s: exclusive-lock feature is off, so it cannot be fenced; enable it with `rbd feature enable %s/%s exclusive-lock`", name, c.pool, name)
	}
	// Refuse a shrink before touching the lock: a config mistake must not fence anyone.
	cur, err := rbdSize(h)
	if err != nil {
		return nil, fmt.Errorf("rbd: image %s: size: %w", name, err)
	}
	if cur > size {
		return nil, fmt.Errorf("rbd: image %s: existing size %d > configured %d: %w", name, cur, size, backend.ErrShrink)
	}
	opened := time.Now()
	if err := c.lock(h, name, opts.Fence, standby != nil, start, opened); err != nil {
		return nil, err
	}
	locked = true
	// The size may have changed before we held the lock; only the owner can change it now.
	if cur, err = rbdSize(h); err != nil {
		return nil, fmt.Errorf("rbd: image %s: size: %w", name, err)
	}
	if cur > size {
		return nil, fmt.Errorf("rbd: image %s: existing size %d > configured %d: %w", name, cur, size, backend.ErrShrink)
	}
	if cur < size {
		if err := rbdGrow(h, size); err != nil {
			return nil, fmt.Errorf("rbd: image %s: grow %d -> %d: %w", name, cur, size, err)
		}
	}
	img := &image{c: c, name: name, h: h, refs: 1}
	img.size.Store(size)
	// Read with the lock held, so nobody else can change it meanwhile; a failure only costs
	// the round trips LoadState then makes itself.
	if kv, all, err := rbdMetaPrefix(h, stateKeyPrefix); err == nil && all {
		img.stateOK, img.stateAt, img.stateUsed = true, kv, map[string]bool{}
	}
	ok = true
	return img, nil
}

// lock takes the image's exclusive lock. It never calls acquire while another client is
// known to hold the lock without breaking it first: librbd would ask the holder to hand the
// lock over and, if the holder hangs, block for about 30 s. (That can still happen, bounded,
// if another client takes the lock between the listing and the acquire.) A lock taken with
// rbd_lock_acquire is never handed over on request: a peer asking for it gets -EROFS.
//
// The holders are listed and broken on the header object with cls_lock directly (one round
// trip each), not through librbd's lock_get_owners/lock_break, which list the holders again,
// and their watchers, before breaking (five round trips for the same effect). A takeover of
// hundreds of images pays these round trips on one OSD.
func (c *Cluster) lock(h C.rbd_image_t, name string, fence, standby bool, start, opened time.Time) error {
	oid, err := rbdHeader(h)
	if err != nil {
		return fmt.Errorf("rbd: image %s: header object: %w", name, err)
	}
	holders, err := radosLockers(c.io, oid)
	if err != nil {
		return fmt.Errorf("rbd: image %s: list lock owners: %w", name, err)
	}
	if len(holders) > 0 && !fence {
		// The address is the holder's rados client, which names the node.
		addrs := make([]string, len(holders))
		for i, l := range holders {
			addrs[i] = l.addr
		}
		return fmt.Errorf("rbd: image %s: held by %s: %w", name, strings.Join(addrs, ", "), ErrLocked)
	}
	listed := time.Now()
	var broken []string
	for _, l := range holders {
		if err := c.blocklist(l.addr); err != nil {
			return fmt.Errorf("rbd: image %s: fence: blocklist %s: %w", name, l.addr, err)
		}
		// Only now, with the holder blocklisted (librbd's blocklist on break is off), is
		// its lock broken.
		err := radosBreakLock(c.io, oid, l)
		if errors.Is(err, syscall.ENOENT) {
			continue // the holder released it meanwhile, which is as good as a break
		}
		if err != nil {
			return fmt.Errorf("rbd: image %s: fence: break lock of %s (%s): %w", name, l.addr, l.client, err)
		}
		broken = append(broken, l.addr)
	}
	broke := time.Now()
	defer func() {
		if len(broken) > 0 {
			// Fencing stops another node's I/O: operators must be able to see that it
			// happened. How long each step took is what a takeover of many tenants waits on.
			slog.Warn("rbd: fenced the previous lock holder", "pool", c.pool, "image", name, "holder", strings.Join(broken, ", "),
				"standby", standby, "open", opened.Sub(start), "owners", listed.Sub(opened), "break", broke.Sub(listed), "acquire", time.Since(broke))
		}
	}()
	if err := rbdLockAcquire(h); err != nil {
		if errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EBUSY) {
			// Another client took the lock between listing and acquiring.
			return fmt.Errorf("rbd: image %s: acquire lock: %w: %w", name, ErrLocked, err)
		}
		return fmt.Errorf("rbd: image %s: acquire lock: %w", name, err)
	}
	return nil
}

// fence is one blocklisting of a lock holder by this client.
type fence struct {
	done chan struct{} // closed when the blocklisting is over
	at   time.Time     // when it succeeded
	err  error
}

// blocklistExpire is how long a fenced holder stays on the blocklist (the monitors' own
// default, mon_osd_blocklist_default_expire, made explicit): a fenced process must have
// stopped by then. fenceReuse is how long a successful blocklisting of a holder is relied on
// for its other images without asking the monitors again: far below blocklistExpire, since
// the entry must outlive every break that relies on it.
const (
	blocklistExpire = time.Hour
	fenceReuse      = 10 * time.Minute
)

// blocklist blocklists the rados client at addr, once for all the images it holds: the
// first caller asks the monitors (and waits for the osdmap that holds the entry), the
// callers that come meanwhile wait for its answer, and later ones reuse a success for
// fenceReuse. A failure is not remembered: the next caller tries again.
func (c *Cluster) blocklist(addr string) error {
	c.mu.Lock()
	f := c.fences[addr]
	if f != nil && (f.err != nil || f.at.IsZero() || time.Since(f.at) <= fenceReuse) {
		// Under way (wait for it) or done and recent enough.
		c.mu.Unlock()
		<-f.done
		return f.err
	}
	f = &fence{done: make(chan struct{})}
	c.fences[addr] = f
	c.mu.Unlock()
	start := time.Now()
	err := c.conn.blocklistAdd(addr, blocklistExpire)
	c.mu.Lock()
	f.err, f.at = err, time.Now()
	if err != nil {
		delete(c.fences, addr) // not remembered: the next caller tries again
	}
	close(f.done)
	c.mu.Unlock()
	if err == nil {
		slog.Warn("rbd: blocklisted a lock holder", "pool", c.pool, "holder", addr, "took", time.Since(start))
	}
	return err
}

// release drops one reference to img and closes it with the last one.
func (c *Cluster) release(img *image) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if img.refs <= 0 {
		return nil
	}
	img.refs--
	if img.refs > 0 {
		return nil
	}
	if c.open[img.name] == img {
		delete(c.open, img.name)
		if c.wanted[img.name] && !c.closed && !c.fenced.Load() {
			h, err := img.park()
			if err == nil {
				c.idle[img.name] = h
			}
			return err
		}
	}
	return img.close()
}

// Prepare makes this client a hot standby for the image called name: it opens the image
// without taking its lock (no I/O, nothing the holder notices beyond one more watcher) and
// keeps the handle, so that a later Open of name, a takeover, only has to fence and lock.
// It is a no-op if name is open, prepared or being opened. A missing image is an error that
// wraps syscall.ENOENT: the standby never creates images, the owner does.
//
// The standby handle is never used for I/O or for anything that needs the lock: with
// exclusive-lock, librbd would ask the holder to hand the lock over (a dead holder makes that
// wait ~30 s) instead of fencing it. Open takes the lock on it exactly as on a new handle.
func (c *Cluster) Prepare(name string) error {
	if err := backend.ValidName(name); err != nil {
		return fmt.Errorf("rbd: %w", err)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return fmt.Errorf("rbd: image %s: cluster %w", name, backend.ErrClosed)
	}
	if c.fenced.Load() {
		c.mu.Unlock()
		return fmt.Errorf("rbd: image %s: this client was fenced: %w", name, ErrFenced)
	}
	c.wanted[name] = true
	_, open := c.open[name]
	_, idle := c.idle[name]
	_, busy := c.pending[name]
	if open || idle || busy {
		c.mu.Unlock()
		return nil
	}
	done := make(chan struct{})
	c.pending[name] = done
	c.opening.Add(1)
	c.mu.Unlock()

	h, err := rbdOpen(c.io, name, false)
	if err == nil {
		var hasLock bool
		if hasLock, err = rbdHasExclusiveLock(h); err == nil && !hasLock {
			err = errors.New("exclusive-lock feature is off")
		}
		if err != nil {
			_ = rbdClose(h)
		}
	}
	c.mu.Lock()
	delete(c.pending, name)
	close(done)
	keep := err == nil && !c.closed && c.wanted[name] && !c.fenced.Load()
	if keep {
		c.idle[name] = h
	}
	c.mu.Unlock()
	c.opening.Done()
	if err != nil {
		if errors.Is(err, ErrFenced) {
			c.fenced.Store(true)
		}
		return fmt.Errorf("rbd: image %s: open as standby in pool %s: %w", name, c.pool, err)
	}
	if !keep {
		_ = rbdClose(h) // unwanted meanwhile, or the client closed: nothing used it
	}
	return nil
}

// Unprepare ends the standby for name: its idle handle, if any, is closed; an image open
// under that name is closed for good by its last Close.
func (c *Cluster) Unprepare(name string) {
	c.mu.Lock()
	delete(c.wanted, name)
	h, ok := c.idle[name]
	delete(c.idle, name)
	c.mu.Unlock()
	if ok {
		_ = rbdClose(h) // unlocked and never used for I/O: nothing to lose
	}
}

// Standby is the names with an idle standby handle, for status and tests.
func (c *Cluster) Standby() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.idle))
	for name := range c.idle {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}
