package target

import (
	"context"
	"log/slog"
)

// sessionLogLevel is Info for normal sessions, which operators need to see come and go (who is
// attached to which target, from where), and Debug for discovery sessions, which initiators
// and monitoring open and close all day.
func sessionLogLevel(discovery bool) slog.Level {
	if discovery {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// logLogin records a completed login. From here on every line of the connection also names
// its target (tenant, remote and initiator are already on c.log), so the logout line does too.
func (c *conn) logLogin() {
	if c.sess == nil {
		return
	}
	if !c.sess.discovery && c.sess.tg != nil {
		c.log = c.log.With("target", c.sess.tg.cfg.IQN)
	}
	kind := "normal"
	if c.sess.discovery {
		kind = "discovery"
	}
	c.log.Log(context.Background(), sessionLogLevel(c.sess.discovery), "login", "session", kind)
}
