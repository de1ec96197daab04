package target

import (
	"log/slog"
	"math/rand/v2"
	"time"

	"nstarget/target/scsi"
)

type sessionKey struct {
	tg        *Target
	initiator string
	isid      [6]byte
}

// session is one normal or discovery session. With MaxConnections=1 it has exactly one
// connection, whose core holds all its full-feature state; the session is what outlives a
// PDU and what the registry knows: identity, TSIH and nexus.
type session struct {
	key       sessionKey
	tsih      uint16
	cid       uint16
	discovery bool
	tg        *Target
	nexus     scsi.Nexus
	conn      *conn
	counted   bool // holds one resSessions unit of its tenant
}

// reinstateWait bounds how long a login waits for the session it reinstates to end.
const reinstateWait = 10 * time.Second

// admit registers a new normal session, reinstating (closing) an older one with the same
// initiator name and ISID on the same target, and charges it to the tenant's session limit;
// it returns the TSIH or a login status.
func (s *Server) admit(ss *session) (tsih uint16, status uint16) {
	t := ss.conn.tenant
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return 0, loginServiceUnavailable
	}
	if ss.tg.closed.Load() || t.closed.Load() {
		s.mu.Unlock()
		return 0, loginTargetRemoved
	}
	old := s.sessions[ss.key]
	if old != nil {
		delete(s.sessions, ss.key)
		delete(s.tsihs, old.tsih)
	}
	s.mu.Unlock()
	if old != nil {
		ss.conn.log.Info("reinstating session: closing the old one with the same initiator and ISID", "old_tsih", old.tsih)
		old.conn.kill()
		select {
		case <-old.conn.done:
		case <-time.After(reinstateWait):
			return 0, loginTargetError
		}
	}
	if r := s.ledger.take(&t.acct, resSessions, 1); r != granted {
		s.refused(ss.conn.log, t, slog.LevelInfo, "session-limit", "login refused: too many sessions", "refused_by", r.String(),
			"tenant_limit", t.acct.limit[resSessions])
		return 0, loginOutOfResources
	}
	ss.counted = true
	s.mu.Lock()
	defer s.mu.Unlock()
	// Random, not sequential: a counter shared by all tenants would let one tenant count
	// the others' logins from its own TSIHs. Unique server-wide, as the registry needs.
	ss.tsih = 0
	for range 1 << 20 {
		if v := uint16(rand.N(65535)) + 1; s.tsihs[v] == nil {
			ss.tsih = v
			break
		}
	}
	if ss.tsih == 0 {
		s.ledger.give(&t.acct, resSessions, 1)
		ss.counted = false
		return 0, loginOutOfResources
	}
	s.tsihs[ss.tsih] = ss
	s.sessions[ss.key] = ss
	return ss.tsih, 0
}

// release removes ss from the registry if it is still the registered session and gives back
// its session unit.
func (s *Server) release(ss *session) {
	s.mu.Lock()
	if s.sessions[ss.key] == ss {
		delete(s.sessions, ss.key)
	}
	if s.tsihs[ss.tsih] == ss {
		delete(s.tsihs, ss.tsih)
	}
	s.mu.Unlock()
	if ss.counted {
		ss.counted = false
		s.ledger.give(&ss.conn.tenant.acct, resSessions, 1)
	}
}
