package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"nstarget/conf"
)

// socketFlag is the -socket flag of the client commands.
func socketFlag(fs *flag.FlagSet) *string {
	return fs.String("socket", conf.DefaultControlSocket, "control socket of nstarget serve")
}

// cmdStatus asks a running serve what it serves and who is attached.
func cmdStatus(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	sock := socketFlag(fs)
	format := fs.String("o", "text", "text|json")
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 1 {
		return usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(1))}
	}
	if *format != "text" && *format != "json" {
		return usageError{fmt.Sprintf("bad -o %q (text, json)", *format)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), controlDeadline)
	defer cancel()
	reply, err := askControl(ctx, *sock, controlRequest{Op: "status", Tenant: fs.Arg(0)})
	if err != nil {
		return err
	}
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(reply.Status)
	}
	printStatus(stdout, reply.Status)
	return nil
}

func printStatus(w io.Writer, st *status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "TENANT\tNETNS\tSTATE\tPORTAL\tSESSIONS\tCONNECTIONS\tCOMMANDS\tBUFFER\tFAIR WINDOW\n")
	for _, t := range st.Tenants {
		state := t.State
		if t.Error != "" {
			state += ": " + t.Error
		}
		window := "full" // not limited: no other tenant is busy
		if t.Usage.FairWindow > 0 {
			window = fmt.Sprintf("%d/session", t.Usage.FairWindow)
		}
		if t.Usage.FairPace > 0 {
			window += fmt.Sprintf(" +%v/command", t.Usage.FairPace.Round(time.Microsecond))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\n", t.Name, t.Netns, state, t.Portal,
			t.Usage.Sessions, t.Usage.Connections, t.Usage.Commands, mib(t.Usage.BufferBytes), window)
	}
	tw.Flush()
	for _, t := range st.Tenants {
		if len(t.Sessions) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s:\n", t.Name)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "  INITIATOR\tTARGET\tISID\tTSIH\tREMOTE\tSINCE\tCOMMANDS\tREAD\tWRITTEN\n")
		for _, s := range t.Sessions {
			tg := s.Target
			if s.Discovery {
				tg = "(discovery)"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\n", s.Initiator, tg, s.ISID, s.TSIH, s.Remote,
				s.Since.Format(time.RFC3339), s.Commands, mib(int64(s.ReadBytes)), mib(int64(s.WrittenBytes)))
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "\ntotal: %d connections, %d sessions, %d commands, %s buffers (%s)\n",
		st.Total.Connections, st.Total.Sessions, st.Total.Commands, mib(st.Total.BufferBytes), st.Version)
}

func mib(n int64) string { return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20)) }

// cmdReload asks a running serve to re-read its configuration file.
func cmdReload(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("reload", flag.ContinueOnError)
	sock := socketFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	// A reload opens volumes and may wait for nothing else: generous, but bounded.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	reply, err := askControl(ctx, *sock, controlRequest{Op: "reload"})
	if err != nil {
		return err
	}
	if len(reply.Changes) == 0 {
		fmt.Fprintf(stdout, "reloaded: nothing changed (%.1f ms)\n", reply.TookMs)
		return nil
	}
	for _, c := range reply.Changes {
		fmt.Fprintln(stdout, c)
	}
	fmt.Fprintf(stdout, "applied in %.1f ms\n", reply.TookMs)
	return nil
}
