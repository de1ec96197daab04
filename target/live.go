package target

import (
	"context"
	"slices"

	"nstarget/target/chap"
	"nstarget/target/scsi"
)

// Live changes: a reload of the configuration changes tenants while they serve. Whatever a
// change does not touch keeps running: no other session drops, no I/O fails.

// targets is the tenant's current target list: Targets until SetTargets is first called.
func (t *Tenant) targets() []*Target {
	if p := t.live.Load(); p != nil {
		return *p
	}
	return t.Targets
}

// SetTargets replaces the tenant's targets while it serves. Targets that are no longer listed
// are closed: their sessions end and logins to them are refused; targets still listed keep
// their sessions.
func (s *Server) SetTargets(t *Tenant, tgs []*Target) {
	old := t.targets()
	tgs = slices.Clone(tgs)
	t.live.Store(&tgs)
	var gone []*Target
	for _, tg := range old {
		if !slices.Contains(tgs, tg) {
			tg.closed.Store(true)
			gone = append(gone, tg)
		}
	}
	if len(gone) > 0 {
		s.endConns(func(c *conn) bool { return c.tenant == t && c.sess != nil && slices.Contains(gone, c.sess.tg) })
	}
}

// SetLUNs replaces the target's LUN map while it serves: sessions stay logged in, commands in
// flight finish, a removed LUN answers LOGICAL UNIT NOT SUPPORTED from now on, and every
// session is told REPORTED LUNS DATA HAS CHANGED. The caller closes the volumes of removed LUNs
// once no command can still be using them.
func (s *Server) SetLUNs(tg *Target, luns map[uint64]*scsi.LU) {
	tg.setLUNStats(luns)
	tg.dev.SetLUNs(luns)
}

// SetCHAP replaces what logins to the target must prove (nil: nothing). It applies to new
// logins; sessions that already proved the old credentials stay.
func (s *Server) SetCHAP(tg *Target, creds *chap.Credentials) {
	tg.chapLive.Store(&chapSetting{creds: creds})
}

// SetDiscoveryCHAP replaces what discovery logins of the tenant must prove, for new logins.
func (s *Server) SetDiscoveryCHAP(t *Tenant, creds *chap.Credentials) {
	t.discLive.Store(&chapSetting{creds: creds})
}

// SetInitiators replaces the target's allow-list while it serves (empty allows any initiator
// of the tenant). It applies to new logins at once; sessions of initiators no longer allowed
// are ended.
func (s *Server) SetInitiators(tg *Target, initiators []string) {
	var allow map[string]bool
	if len(initiators) > 0 {
		allow = make(map[string]bool, len(initiators))
		for _, n := range initiators {
			allow[n] = true
		}
	}
	tg.allowLive.Store(&allow)
	s.endConns(func(c *conn) bool {
		return c.sess != nil && c.sess.tg == tg && !tg.allows(c.sess.key.initiator)
	})
}

// endConns closes the connections that match (they log nothing of it themselves beyond
// their end) and waits for them to be gone.
func (s *Server) endConns(match func(*conn) bool) {
	s.mu.Lock()
	var victims []*conn
	for c := range s.conns {
		if c.loggedIn.Load() && match(c) {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		// c.log belongs to the connection's goroutine; say it from here.
		s.log.Info("session ended by a configuration change", "tenant", c.tenant.Name,
			"initiator", c.sess.key.initiator, "remote", c.nc.RemoteAddr().String())
		c.kill()
	}
	for _, c := range victims {
		<-c.done
	}
}

// CloseTenant takes a tenant out of service: new connections are refused at once, its
// sessions are asked to log out (Async Message) and, once ctx is done, whatever is still
// connected is closed. When it returns the tenant's sessions are gone, everything they held
// has been given back and the tenant is no longer listed. Other tenants are not touched.
func (s *Server) CloseTenant(ctx context.Context, t *Tenant) {
	t.closed.Store(true)
	s.mu.Lock()
	var conns []*conn
	for c := range s.conns {
		if c.tenant == t {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.requestLogout()
	}
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			c.kill()
			<-c.done
		}
	}
	s.mu.Lock()
	delete(s.tenants, t)
	s.mu.Unlock()
}
