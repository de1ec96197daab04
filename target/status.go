package target

import (
	"encoding/hex"
	"slices"
	"strings"
	"time"
)

// SessionInfo describes one logged-in session, for operators.
type SessionInfo struct {
	Tenant       string    `json:"tenant"`
	Initiator    string    `json:"initiator"`
	Target       string    `json:"target,omitempty"` // empty for discovery sessions
	Discovery    bool      `json:"discovery,omitempty"`
	ISID         string    `json:"isid"`
	TSIH         uint16    `json:"tsih"`
	Remote       string    `json:"remote"`
	Since        time.Time `json:"since"`
	Commands     uint64    `json:"commands"`
	ReadBytes    uint64    `json:"read_bytes"`
	WrittenBytes uint64    `json:"written_bytes"`
}

// Sessions lists the logged-in sessions of every tenant (or of the tenant named, if not
// empty), ordered by tenant, target, initiator and ISID. Each connection is read under its own
// lock, briefly: listing never stalls I/O for long.
func (s *Server) Sessions(tenant string) []SessionInfo {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		if tenant == "" || c.tenant.Name == tenant {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	var out []SessionInfo
	for _, c := range conns {
		c.mu.Lock()
		cr := c.core
		var n counters
		if cr != nil {
			n = cr.counts
		}
		c.mu.Unlock()
		if cr == nil {
			continue // still logging in
		}
		ss := cr.cfg.sess
		si := SessionInfo{
			Tenant: c.tenant.Name, Initiator: ss.key.initiator, Discovery: ss.discovery,
			ISID: hex.EncodeToString(ss.key.isid[:]), TSIH: ss.tsih, Remote: c.nc.RemoteAddr().String(),
			Since: c.since, Commands: n.commands, ReadBytes: n.readBytes, WrittenBytes: n.writtenBytes,
		}
		if ss.tg != nil {
			si.Target = ss.tg.cfg.IQN
		}
		out = append(out, si)
	}
	slices.SortFunc(out, func(a, b SessionInfo) int {
		return strings.Compare(a.Tenant+"\x00"+a.Target+"\x00"+a.Initiator+"\x00"+a.ISID,
			b.Tenant+"\x00"+b.Target+"\x00"+b.Initiator+"\x00"+b.ISID)
	})
	return out
}
