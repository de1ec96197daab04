package cluster

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// keeper renews one lease and calls lost before the lease can have expired in etcd.
//
// Why a local deadline and not only keepalive errors: an owner key is safe only while this
// node's lease lives, and etcd expires the lease TTL after the last keepalive it *received*,
// whether or not this node hears about it. A partition, a stalled TCP connection or a GC pause
// produces no error at all, just silence; clientv3's KeepAlive channel would stay open (it
// retries) while the other nodes see the lease expire and claim the tenants. So the keeper
// tracks the earliest moment etcd may expire the lease, from facts it has:
//
//	etcd renewed the lease at some instant after this node *sent* the keepalive (sent) and
//	granted ttl from then, so the lease lives at least until sent + ttl.
//
// It uses the send time, not the time the answer arrived (which would overstate the lease by
// the round trip), and fires lost at sent + ttl - margin: margin pays for the caller stopping
// its tenants, timer and scheduling delays, and clock-rate differences. The timer is separate
// from the renewing goroutine so that a keepalive call that ignores its context cannot delay
// it. Once lost has fired the lease is never trusted again, even if a late renewal succeeds.
type keeper struct {
	cli    *clientv3.Client
	id     clientv3.LeaseID
	margin time.Duration
	every  time.Duration // renewal period: three tries fit before the deadline
	log    *slog.Logger
	onLost func(reason string)

	mu       sync.Mutex
	deadline time.Time // when lost fires unless renewed
	timer    *time.Timer
	expired  bool
	stopped  bool
	// firing is held, from under mu, while onLost runs, so stop can wait for it: no
	// callback outlives the session.
	firing sync.Mutex
}

// startKeeper arms the watchdog for a lease granted by a request sent at sent with ttl, and
// renews it until ctx ends or the lease is lost. stop (idempotent) disarms it and waits.
func startKeeper(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, sent time.Time, ttl, margin time.Duration, log *slog.Logger, onLost func(string)) (stop func()) {
	k := &keeper{cli: cli, id: id, margin: margin, every: (ttl - margin) / 3, log: log, onLost: onLost}
	k.deadline = sent.Add(ttl - margin)
	// Under mu: a deadline already past (a grant that took longer than ttl - margin) fires
	// the timer at once, and expire must find k.timer set.
	k.mu.Lock()
	k.timer = time.AfterFunc(time.Until(k.deadline), func() { k.expire("no keepalive answer in time") })
	k.mu.Unlock()
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.renew(rctx, sent)
	}()
	return func() {
		cancel()
		<-done
		k.mu.Lock()
		k.stopped = true
		k.timer.Stop()
		k.mu.Unlock()
		k.firing.Lock() // an onLost already under way finishes first
		k.firing.Unlock()
	}
}

func (k *keeper) renew(ctx context.Context, last time.Time) {
	next := last.Add(k.every)
	for {
		t := time.NewTimer(time.Until(next))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		k.mu.Lock()
		deadline, expired := k.deadline, k.expired
		k.mu.Unlock()
		if expired {
			return
		}
		sent := time.Now()
		actx, cancel := context.WithDeadline(ctx, deadline)
		resp, err := k.cli.KeepAliveOnce(actx, k.id)
		cancel()
		switch {
		case err == nil:
			k.renewed(sent, time.Duration(resp.TTL)*time.Second)
			next = sent.Add(k.every)
		case ctx.Err() != nil:
			return
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			k.expire("etcd says the lease is gone")
			return
		default:
			k.log.Warn("lease keepalive failed", "lease", int64(k.id), "err", err, "deadline", deadline.Format(time.RFC3339Nano))
			next = time.Now().Add(k.every / 4)
		}
	}
}

func (k *keeper) renewed(sent time.Time, ttl time.Duration) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.expired || k.stopped {
		return
	}
	d := sent.Add(ttl - k.margin)
	if !d.After(k.deadline) {
		return
	}
	// Stop fails when the timer has fired: expire is running or about to, and wins.
	if !k.timer.Stop() {
		return
	}
	k.deadline = d
	k.timer.Reset(time.Until(d))
}

func (k *keeper) expire(reason string) {
	k.mu.Lock()
	if k.expired || k.stopped {
		k.mu.Unlock()
		return
	}
	k.expired = true
	k.timer.Stop()
	k.firing.Lock()
	k.mu.Unlock()
	defer k.firing.Unlock()
	k.onLost(reason)
}
