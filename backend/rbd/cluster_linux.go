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
	closed  bool
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
	return &Cluster{pool: cfg.Pool, conn: conn, io: io, id: poolID(fsid, ioctxID(io)), open: make(map[string]*image), pending: make(map[string]chan struct{}), fences: make(map[string]*fence)}, nil
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
		c.mu.Unlock()

		// Outside mu: opens of different images (a takeover of many tenants) overlap.
		img, err := c.openImage(name, size, opts)
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

// openImage opens, locks and sizes a new image handle; Open makes sure that no other open of
// the same name runs at the same time.
func (c *Cluster) openImage(name string, size int64, opts OpenOptions) (*image, error) {
	start := time.Now()
	h, err := rbdOpen(c.io, name, false)
	if errors.Is(err, syscall.ENOENT) {
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
	if err := c.lock(h, name, opts.Fence, start, opened); err != nil {
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
func (c *Cluster) lock(h C.rbd_image_t, name string, fence bool, start, opened time.Time) error {
	owners, err := rbdLockOwners(h)
	if err != nil {
		return fmt.Errorf("rbd: image %s: list lock owners: %w", name, err)
	}
	if len(owners) > 0 && !fence {
		// The owner is the holder's rados client address, which names the node.
		return fmt.Errorf("rbd: image %s: held by %s: %w", name, strings.Join(owners, ", "), ErrLocked)
	}
	listed := time.Now()
	var broken []string
	for _, o := range owners {
		if err := c.blocklist(o); err != nil {
			return fmt.Errorf("rbd: image %s: fence: blocklist %s: %w", name, o, err)
		}
		// Only now, with the holder blocklisted (librbd's blocklist on break is off), is
		// its lock broken.
		err := rbdLockBreak(h, o)
		if errors.Is(err, syscall.ENOENT) {
			continue // the holder released it meanwhile, which is as good as a break
		}
		if err != nil {
			return fmt.Errorf("rbd: image %s: fence: break lock of %s: %w", name, o, err)
		}
		broken = append(broken, o)
	}
	broke := time.Now()
	defer func() {
		if len(broken) > 0 {
			// Fencing stops another node's I/O: operators must be able to see that it
			// happened. How long each step took is what a takeover of many tenants waits on.
			slog.Warn("rbd: fenced the previous lock holder", "pool", c.pool, "image", name, "holder", strings.Join(broken, ", "),
				"open", opened.Sub(start), "owners", listed.Sub(opened), "break", broke.Sub(listed), "acquire", time.Since(broke))
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
	}
	return img.close()
}
