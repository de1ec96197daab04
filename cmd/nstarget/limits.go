package main

import (
	"log/slog"
	"syscall"

	"nstarget/conf"
	"nstarget/target"
)

// raiseFDLimit lifts the soft RLIMIT_NOFILE to the hard limit: every tenant connection is a
// descriptor, and the soft default (often 1024) would let a few hundred connections of one
// tenant make accept fail for all others. Go's os package does the same at start-up since Go
// 1.19; doing it here makes it explicit, logged, and independent of that. It returns the soft
// limit in force afterwards (0 if unknown).
func raiseFDLimit(log *slog.Logger) uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.Warn("cannot read RLIMIT_NOFILE; connection limits derive from the server's default", "err", err)
		return 0
	}
	soft := rl.Cur
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			log.Warn("cannot raise RLIMIT_NOFILE to its hard limit", "soft", soft, "hard", rl.Max, "err", err)
			return soft
		}
	}
	log.Info("descriptor limit", "soft_before", soft, "soft", rl.Cur, "hard", rl.Max)
	return rl.Cur
}

// targetOptions maps the configuration's resource bounds onto the target layer. A zero
// max_connections leaves MaxConnections to the target, which derives it from the (raised)
// RLIMIT_NOFILE less its descriptor reserve.
func targetOptions(log *slog.Logger, srv conf.Server, nofile uint64) target.Options {
	if srv.MaxConnections > 0 && nofile > 0 && uint64(srv.MaxConnections) >= nofile {
		log.Warn("server.max_connections is not below RLIMIT_NOFILE: accept may run out of descriptors before the limit applies",
			"max_connections", srv.MaxConnections, "nofile", nofile)
	}
	return target.Options{
		Logger:         log,
		NopInterval:    srv.NopInterval,
		NopTimeout:     srv.NopTimeout,
		TenantLimits:   targetLimits(srv.Limits),
		MaxBufferBytes: srv.MaxBuffer,
		MaxConnections: srv.MaxConnections,
		NoFairShare:    !srv.FairShare,
	}
}

func targetLimits(l conf.Limits) target.Limits {
	return target.Limits{
		Connections: l.Connections,
		Sessions:    l.Sessions,
		Commands:    l.Commands,
		BufferBytes: l.Buffer,
		Weight:      l.Weight,
	}
}
