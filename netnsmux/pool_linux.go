package netnsmux

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// init locks the main goroutine to the main thread (m0) of every program that imports this
// package. Go can start new threads by cloning whatever thread needs one; cloning from a thread
// that sits in a tenant namespace would give the new thread that namespace, and the main thread
// is the one a program can least afford to lose (golang/go#53210). Keeping main on m0 means m0 is
// never handed to a pool worker, so no tenant namespace is ever entered on it, and threads the
// runtime creates from a locked thread come from the clean template thread. The cost for
// importers: their main goroutine stays on one OS thread for the whole run (invisible to almost
// every program; it matters only to code that wanted main to migrate).
func init() { runtime.LockOSThread() }

// step is one function to run inside one namespace. id 0 means "unknown": the worker always
// calls setns for it.
type step struct {
	name string // for error messages
	fd   int
	id   ID
	// open, if set, runs first, in whatever namespace the thread is in, and gives fd and id
	// (a namespace the registry does not hold yet, opened by the worker that enters it); an
	// error skips the step.
	open func() (fd int, id ID, err error)
	fn   func() error
}

// job is one hand-off to a worker: one Do call, or a batch of steps (bring-up of many listeners
// pays the cross-thread hand-off once per batch instead of once per listener).
type job struct {
	steps []step
	errs  []error
	done  chan struct{}
}

// pool is a fixed set of goroutines, each locked to its OS thread for its whole life, that run
// jobs inside namespaces. Each worker remembers the id of the namespace its thread is in and
// calls setns only when a job wants another one (lazy setns).
type pool struct {
	log    *slog.Logger
	homeFD int // the process's own network namespace (the main thread's)
	homeID ID
	// homeIDFromCookie: ids are SO_NETNS_COOKIE values (fallback scheme, or no NS_GET_ID).
	homeIDFromCookie bool
	jobs             chan *job
	stop             chan struct{}
	wg               sync.WaitGroup
	isHeld           func(ID) bool // whether the registry still holds a namespace; else workers go home

	switches, skips, discarded atomic.Uint64

	mu       sync.Mutex
	workers  map[*worker]struct{}
	stopping bool

	// failRestore, when set (tests only), is called before each switch back home; an error
	// makes the switch-back fail as if setns had failed.
	failRestore func() error
}

type worker struct {
	ping chan struct{} // "re-check whether your namespace is still held"
	tid  atomic.Int32
	cur  atomic.Uint64 // ID of the namespace this thread is in; 0 = unknown
}

// newPool starts n workers. With cookieIDs (the fallback identity scheme) home's id is taken from
// SO_NETNS_COOKIE like every tenant's, so that ids of one kind are never compared with the other.
func newPool(n int, log *slog.Logger, isHeld func(ID) bool, cookieIDs bool) (*pool, error) {
	fd, err := unix.Open("/proc/self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netnsmux: open home namespace: %w", err)
	}
	id, err := checkNSFD(fd, cookieIDs)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netnsmux: home namespace: %w", err)
	}
	p := &pool{
		log: log, homeFD: fd, homeID: id, isHeld: isHeld,
		jobs: make(chan *job), stop: make(chan struct{}), workers: map[*worker]struct{}{},
	}
	// Every worker starts by entering home; if that cannot work (setns denied, e.g. by a seccomp
	// policy) say so now instead of discarding and re-spawning workers forever.
	cookie, err := p.probeHome()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if id == 0 {
		// No NS_GET_ID (pre-6.18) or fallback scheme: home's id is its socket cookie.
		p.homeIDFromCookie = true
		p.homeID = cookie
	}
	for i := 0; i < n; i++ {
		p.spawn()
	}
	return p, nil
}

// probeHome enters home on a thread of its own and returns home's SO_NETNS_COOKIE (the fallback
// scheme's id for it). The main thread is home by construction (locked in init, never given to
// us), but we are not on it, and the thread we run on could be anywhere.
func (p *pool) probeHome() (ID, error) {
	type res struct {
		id  ID
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(p.homeFD, unix.CLONE_NEWNET); err != nil {
			ch <- res{err: fmt.Errorf("netnsmux: setns home: %w", err)}
			return // exit locked: thread state unknown
		}
		id, err := threadNSID()
		runtime.UnlockOSThread()
		if err != nil {
			err = fmt.Errorf("netnsmux: home namespace id: %w", err)
		}
		ch <- res{id, err}
	}()
	r := <-ch
	return r.id, r.err
}

// spawn starts one worker unless the pool is stopping.
func (p *pool) spawn() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		return
	}
	w := &worker{ping: make(chan struct{}, 1)}
	p.workers[w] = struct{}{}
	p.wg.Add(1)
	go p.run(w)
}

// run is a worker's whole life. It returns with its thread still locked whenever the thread's
// namespace is not known to be home, so the runtime terminates that thread instead of reusing it.
func (p *pool) run(w *worker) {
	defer p.wg.Done()
	runtime.LockOSThread()
	restorePrio := boostThread()
	w.tid.Store(int32(unix.Gettid()))
	// The thread we were given may come from anywhere (another library may have left it in some
	// namespace): start from home unconditionally.
	if err := unix.Setns(p.homeFD, unix.CLONE_NEWNET); err != nil {
		p.discard(w, fmt.Errorf("setns home at start: %w", err))
		return
	}
	p.switches.Add(1)
	w.cur.Store(uint64(p.homeID))
	for {
		select {
		case <-p.stop:
			if !p.goHome(w) {
				return
			}
			p.mu.Lock()
			delete(p.workers, w)
			p.mu.Unlock()
			restorePrio()
			runtime.UnlockOSThread()
			return
		case <-w.ping:
			if !p.settle(w) {
				return
			}
		case j := <-p.jobs:
			for i, st := range j.steps {
				j.errs[i] = p.exec(w, st)
			}
			close(j.done)
			if !p.settle(w) {
				return
			}
		}
	}
}

func (p *pool) exec(w *worker, j step) (err error) {
	if j.open != nil {
		if j.fd, j.id, err = j.open(); err != nil {
			return err
		}
	}
	if j.id != 0 && ID(w.cur.Load()) == j.id {
		p.skips.Add(1)
	} else {
		if err := unix.Setns(j.fd, unix.CLONE_NEWNET); err != nil {
			// setns is all-or-nothing: the thread is still where it was.
			return fmt.Errorf("netnsmux: setns into %s: %w", j.name, err)
		}
		p.switches.Add(1)
		w.cur.Store(uint64(j.id))
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("netnsmux: Do function panicked: %v", r)
		}
	}()
	return j.fn()
}

// settle sends the worker home if the namespace it is in is no longer held by the registry
// (holding it would pin a deleted namespace) or is unknown. It reports false if the worker must
// exit locked.
func (p *pool) settle(w *worker) bool {
	cur := ID(w.cur.Load())
	if cur == p.homeID || (cur != 0 && p.isHeld(cur)) {
		return true
	}
	return p.goHome(w)
}

func (p *pool) goHome(w *worker) bool {
	if ID(w.cur.Load()) == p.homeID {
		return true
	}
	var err error
	if p.failRestore != nil {
		err = p.failRestore()
	}
	if err == nil {
		err = unix.Setns(p.homeFD, unix.CLONE_NEWNET)
	}
	if err != nil {
		p.discard(w, fmt.Errorf("setns home: %w", err))
		return false
	}
	p.switches.Add(1)
	w.cur.Store(uint64(p.homeID))
	return true
}

// discard forgets a worker whose thread could not be brought home; the caller returns from the
// goroutine while still locked, which makes the runtime kill the thread. A fresh worker replaces it.
func (p *pool) discard(w *worker, err error) {
	p.discarded.Add(1)
	p.log.Error("netnsmux: worker thread left in a foreign namespace; discarding the thread",
		"tid", w.tid.Load(), "netns_id", w.cur.Load(), "err", err)
	p.mu.Lock()
	delete(p.workers, w)
	p.mu.Unlock()
	p.spawn()
}

// do runs fn in the namespace (fd, id) on a worker. ctx bounds only the wait for a free worker:
// once fn started it runs to completion, because the caller's fd must outlive it.
func (p *pool) do(ctx context.Context, name string, fd int, id ID, fn func() error) error {
	return p.doBatch(ctx, []step{{name: name, fd: fd, id: id, fn: fn}})[0]
}

// doBatch runs steps in order on one worker and returns one error per step.
func (p *pool) doBatch(ctx context.Context, steps []step) []error {
	j := &job{steps: steps, errs: make([]error, len(steps)), done: make(chan struct{})}
	fail := func(err error) []error {
		for i := range j.errs {
			j.errs[i] = err
		}
		return j.errs
	}
	select {
	case p.jobs <- j:
	case <-ctx.Done():
		return fail(ctx.Err())
	case <-p.stop:
		return fail(ErrClosed)
	}
	<-j.done
	return j.errs
}

// pingAll asks every worker to re-check its namespace (after the registry released one).
func (p *pool) pingAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for w := range p.workers {
		select {
		case w.ping <- struct{}{}:
		default:
		}
	}
}

// close stops the workers (each goes home first) and releases the home handle.
func (p *pool) close() {
	p.mu.Lock()
	if p.stopping {
		p.mu.Unlock()
		return
	}
	p.stopping = true
	close(p.stop)
	p.mu.Unlock()
	p.wg.Wait()
	unix.Close(p.homeFD)
}

// controlBoost is how many nice levels above the rest of the process the workers run. Their
// work is small (µs per namespace) and latency-bound: a new namespace is served once a worker
// got a CPU, and on a machine whose CPUs are busy with I/O (the process's own connections among
// others) a thread of equal weight that wakes up, or returns from a system call, waited up to
// 10-14 ms for one (runtime trace of the churn benchmark, issue 11). 5 levels is about 3x the
// CPU weight.
const controlBoost = 5

// boostThread raises the CPU priority of the calling thread, which must be locked to its
// goroutine, by controlBoost nice levels, best effort (a process without CAP_SYS_NICE or
// RLIMIT_NICE room keeps its level); the function it returns puts the level back and must be
// called before the thread is unlocked.
func boostThread() (restore func()) {
	tid := unix.Gettid()
	prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		return func() {}
	}
	nice := 20 - prio // the system call answers 20 - nice, to stay positive
	if unix.Setpriority(unix.PRIO_PROCESS, tid, max(nice-controlBoost, -20)) != nil {
		return func() {}
	}
	return func() { unix.Setpriority(unix.PRIO_PROCESS, tid, nice) }
}
