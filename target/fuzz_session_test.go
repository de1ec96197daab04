package target

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// FuzzSessionInput feeds arbitrary bytes to a logged-in full-feature connection: whatever
// arrives, the connection must neither panic nor hang once the initiator goes away.
func FuzzSessionInput(f *testing.F) {
	h := scsiCmdHeader(1, 512, 1, flagFinal|flagRead, []byte{0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0})
	h[1] = flagFinal | flagRead
	binary := appendPDU(nil, &h, nil, nil, false, false)
	f.Add(binary)
	w := scsiCmdHeader(2, 1024, 2, flagFinal|flagRead, []byte{0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0})
	w[1] = flagWrite
	f.Add(appendPDU(nil, &w, nil, make([]byte, 512), false, false))
	var tmf bhs
	tmf[0] = opTMFReq | flagImmediate
	tmf[1] = flagFinal | tmfAbortTask
	tmf.setU32(offTTT, 2)
	f.Add(append(appendPDU(nil, &w, nil, nil, false, false), appendPDU(nil, &tmf, nil, nil, false, false)...))
	var txt bhs
	txt[0] = opTextReq
	txt[1] = flagContinue
	txt.setU32(offCmdSN, 1)
	f.Add(appendPDU(nil, &txt, nil, []byte("SendTargets=A"), false, false))

	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		tenant := srv.NewTenant("fuzz", Limits{})
		tenant.Targets = []*Target{newTarget(TargetConfig{IQN: "iqn.f:t"}, newRAMDevice(1<<20))}
		cli, sc := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.ServeConn(context.Background(), sc, tenant)
			close(done)
		}()
		go io.Copy(io.Discard, cli)
		req := loginReq(1, 3, true, false, "InitiatorName=iqn.f:i", "TargetName=iqn.f:t", "InitialR2T=No")
		req.BHS.setU32(offCmdSN, 1)
		cli.SetWriteDeadline(time.Now().Add(testTimeout))
		cli.Write(appendPDU(nil, &req.BHS, nil, req.Data, false, false))
		cli.Write(in)
		cli.Close()
		select {
		case <-done:
		case <-time.After(testTimeout):
			t.Fatal("connection did not end after the initiator closed")
		}
	})
}
