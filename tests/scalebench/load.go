//go:build linux

package main

// The load client: `scalebench load` reads a loadSpec (JSON) on stdin, logs every session in,
// prints "ready", waits for a line "go" on stdin, runs the workload for the duration, prints
// "window-end", logs out and prints one JSON loadResult line. The driver runs it as a separate
// process (one per group, e.g. noisy and quiet tenants) so the server's CPU time is not mixed
// with the client's, and groups do not share one Go scheduler.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

type sessSpec struct {
	Tenant    string `json:"tenant"`
	NSPath    string `json:"ns"`
	Portal    string `json:"portal"`
	IQN       string `json:"iqn"`
	Initiator string `json:"initiator"`
	ISID      byte   `json:"isid"`
	Write     bool   `json:"write"`
	BS        int    `json:"bs"`
	QD        int    `json:"qd"`
	Random    bool   `json:"random"`
	Span      int64  `json:"span"` // bytes of the LUN used (0: all)
}

type loadSpec struct {
	Sessions []sessSpec    `json:"sessions"`
	Duration time.Duration `json:"duration"`
}

// hist is a log-linear latency histogram: 16 sub-buckets per power of two of nanoseconds
// (~4% resolution).
type hist [64 * 16]uint64

func histIndex(ns int64) int {
	if ns < 16 {
		return int(max(ns, 0))
	}
	e := 63 - bits.LeadingZeros64(uint64(ns)) // >= 4
	m := (ns >> (e - 4)) & 15
	return e*16 + int(m)
}

func histValue(i int) float64 {
	if i < 16 {
		return float64(i)
	}
	e, m := i/16, i%16
	return math.Ldexp(float64(16+m)+0.5, e-4)
}

func (h *hist) add(o *hist) {
	for i := range h {
		h[i] += o[i]
	}
}

// quantile in microseconds.
func (h *hist) quantile(q float64) float64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	if n == 0 {
		return 0
	}
	want := uint64(math.Ceil(q * float64(n)))
	var acc uint64
	for i, c := range h {
		acc += c
		if acc >= want {
			return histValue(i) / 1e3
		}
	}
	return 0
}

type sessResult struct {
	Tenant  string  `json:"tenant"`
	Ops     uint64  `json:"ops"`
	Bytes   uint64  `json:"bytes"`
	Errors  uint64  `json:"errors"`
	Asyncs  int     `json:"asyncs"`
	Err     string  `json:"err,omitempty"`
	Hist    *hist   `json:"hist"`
	Seconds float64 `json:"seconds"`
}

type loadResult struct {
	Sessions []sessResult `json:"sessions"`
	LoginErr string       `json:"login_err,omitempty"`
}

// runLoadCmd is `scalebench load`.
func runLoadCmd() error {
	in := bufio.NewReader(os.Stdin)
	var spec loadSpec
	line, err := in.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("read spec: %w", err)
	}
	if err := json.Unmarshal(line, &spec); err != nil {
		return fmt.Errorf("spec: %w", err)
	}
	ss := make([]*sess, len(spec.Sessions))
	caps := make([]uint64, len(spec.Sessions))
	bsz := make([]uint32, len(spec.Sessions))
	var res loadResult
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, sp := range spec.Sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, blocks, bs, err := openSession(sp)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && res.LoginErr == "" {
				res.LoginErr = fmt.Sprintf("%s: %v", sp.Tenant, err)
			}
			ss[i], caps[i], bsz[i] = s, blocks, bs
		}()
	}
	wg.Wait()
	out := bufio.NewWriter(os.Stdout)
	if res.LoginErr != "" {
		for _, s := range ss {
			if s != nil {
				s.close()
			}
		}
		json.NewEncoder(out).Encode(res)
		return out.Flush()
	}
	fmt.Fprintln(out, "ready")
	out.Flush()
	if l, err := in.ReadString('\n'); err != nil || l != "go\n" {
		return fmt.Errorf("want go: %q %v", l, err)
	}
	for _, s := range ss {
		go s.reader()
	}
	var stop atomic.Bool
	start := time.Now()
	deadline := start.Add(spec.Duration)
	results := make([]sessResult, len(ss))
	var wwg sync.WaitGroup
	for i, s := range ss {
		sp := spec.Sessions[i]
		bs := uint32(bsz[i])
		blocksPerIO := uint32(sp.BS) / bs
		span := caps[i]
		if sp.Span > 0 && uint64(sp.Span)/uint64(bs) < span {
			span = uint64(sp.Span) / uint64(bs)
		}
		slots := span / uint64(blocksPerIO)
		var seq atomic.Uint64
		seq.Store(uint64(sp.ISID) * 7919)
		hs := make([]hist, sp.QD)
		ops := make([]uint64, sp.QD)
		errs := make([]uint64, sp.QD)
		var w sync.WaitGroup
		for q := 0; q < sp.QD; q++ {
			w.Add(1)
			go func() {
				defer w.Done()
				r := rand.New(rand.NewPCG(uint64(i)<<32|uint64(q), uint64(time.Now().UnixNano())))
				var out []byte
				if sp.Write {
					out = make([]byte, sp.BS)
					for k := range out {
						out[k] = byte(r.Uint32())
					}
				}
				p := &pend{done: make(chan error, 1)}
				for !stop.Load() {
					var slot uint64
					if sp.Random {
						slot = r.Uint64N(slots)
					} else {
						slot = seq.Add(1) % slots
					}
					t0 := time.Now()
					err := s.rw(sp.Write, slot*uint64(blocksPerIO), blocksPerIO, bs, out, p)
					t1 := time.Now()
					if err != nil {
						errs[q]++
						if s.failed() != nil {
							return
						}
						continue
					}
					if t1.Before(deadline) {
						ops[q]++
						hs[q][histIndex(t1.Sub(t0).Nanoseconds())]++
					}
				}
			}()
		}
		wwg.Add(1)
		go func() {
			defer wwg.Done()
			w.Wait()
			var h hist
			r := sessResult{Tenant: sp.Tenant, Hist: &h}
			for q := range hs {
				h.add(&hs[q])
				r.Ops += ops[q]
				r.Errors += errs[q]
			}
			r.Bytes = r.Ops * uint64(sp.BS)
			results[i] = r
		}()
	}
	time.Sleep(time.Until(deadline)) // the measurement window itself
	stop.Store(true)
	fmt.Fprintln(out, "window-end")
	out.Flush()
	wwg.Wait()
	for i, s := range ss {
		s.pmu.Lock()
		results[i].Asyncs = s.asyncs
		if s.err != nil {
			results[i].Err = s.err.Error()
		}
		s.pmu.Unlock()
		results[i].Seconds = spec.Duration.Seconds()
	}
	// Log out: a clean end (the reader sees the Logout Response and stops).
	var lw sync.WaitGroup
	for i, s := range ss {
		if results[i].Err != "" {
			s.close()
			continue
		}
		lw.Add(1)
		go func() {
			defer lw.Done()
			s.sendLogout()
			done := make(chan struct{})
			go func() {
				for s.failed() == nil { // the reader ends with the Logout Response
					time.Sleep(5 * time.Millisecond)
				}
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
			}
			s.close()
		}()
	}
	lw.Wait()
	res.Sessions = results
	json.NewEncoder(out).Encode(res)
	return out.Flush()
}

// openSession dials from the tenant's namespace, logs in and reads the LUN's capacity.
func openSession(sp sessSpec) (*sess, uint64, uint32, error) {
	nc, err := dialNS(sp.NSPath, sp.Portal, 10*time.Second)
	if err != nil {
		return nil, 0, 0, err
	}
	s := newSess(nc)
	isid := [6]byte{0x80, 0, 0, 0, 0x5b, sp.ISID}
	if err := s.login(sp.Initiator, sp.IQN, isid); err != nil {
		s.close()
		return nil, 0, 0, err
	}
	blocks, bs, err := s.readCapacity16()
	if err != nil {
		s.close()
		return nil, 0, 0, err
	}
	if bs == 0 || uint32(sp.BS)%bs != 0 {
		s.close()
		return nil, 0, 0, fmt.Errorf("block size %d does not divide %d", bs, sp.BS)
	}
	return s, blocks, bs, nil
}

// discoverHere logs into a discovery session, runs SendTargets and logs out, from the calling
// goroutine's locked thread, which is already in the tenant's namespace: the connection is made
// there.
func discoverHere(portal, initiator string) (string, error) {
	c, err := net.DialTimeout("tcp", portal, 5*time.Second)
	if err != nil {
		return "", err
	}
	return discoverOn(c.(*net.TCPConn), initiator)
}

// discoverOn logs in for discovery on nc, runs SendTargets=All, logs out and closes nc.
func discoverOn(nc *net.TCPConn, initiator string) (string, error) {
	s := newSess(nc)
	defer s.close()
	if err := s.login(initiator, "", [6]byte{0x80, 0, 0, 0, 0x5c, 1}); err != nil {
		return "", err
	}
	ans, err := s.sendTargets()
	if err != nil {
		return "", err
	}
	s.logoutSync()
	return ans, nil
}
