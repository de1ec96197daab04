package main

import (
	"bytes"
	"strings"
	"testing"

	"nstarget/conf"
)

func TestEmbeddedConfigsAreValid(t *testing.T) {
	cfg, err := conf.Parse("example.toml", []byte(exampleConfig))
	if err != nil {
		t.Fatalf("example: %v", err)
	}
	if len(cfg.Tenants) != 2 || cfg.Tenants[0].Targets[0].IQN != cfg.Tenants[1].Targets[0].IQN {
		t.Errorf("example should show two tenants sharing an IQN: %+v", cfg.Tenants)
	}
	doc := strings.NewReplacer("@PREFIX@", "nstdemo-1", "@POOL@", "/tmp/pool").Replace(demoConfig)
	cfg, err = conf.Parse("demo.toml", []byte(doc))
	if err != nil {
		t.Fatalf("demo: %v", err)
	}
	for _, tn := range cfg.Tenants {
		if tn.Portal != "10.0.0.1:3260" || tn.Targets[0].IQN != demoIQN {
			t.Errorf("demo tenant %s: portal %s iqn %s; every tenant must use the same address and IQN", tn.Name, tn.Portal, tn.Targets[0].IQN)
		}
	}
}

func TestCommandLineErrorsExitTwoAndNameTheArgument(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "-c"}, "-c"},
		{[]string{"serve", "-c", "x.toml", "-pprof", "6060"}, "-pprof"},
		{[]string{"demo", "-forever"}, "-forever"},
		{[]string{"demo", "-log-format", "xml"}, `"xml"`},
		{[]string{"example", "x"}, `"x"`},
	} {
		var out, errOut bytes.Buffer
		if code := run(c.args, &out, &errOut); code != exitUsage || !strings.Contains(errOut.String(), c.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d naming %s", c.args, code, errOut.String(), exitUsage, c.want)
		}
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"help"}, &out, &errOut); code != exitOK || !strings.Contains(out.String(), "serve   -c FILE") {
		t.Errorf("help: exit %d, %q", code, out.String())
	}
}
