package conf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"nstarget/target/chap"
)

const chapDoc = `[[tenant]]
name = "a"
chap_algorithms = ["SHA3-256", "sha256", "MD5"]
  [tenant.discovery_chap]
  user = "disc"
  secret_file = "disc.secret"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:t"
    [tenant.target.chap]
    user = "host1"
    secret = "0123456789ab"
    mutual_user = "iqn.2026-11.io.example:t"
    mutual_secret_file = "/SECRETDIR/mutual.secret"
    algorithms = ["SHA-256"]
    [[tenant.target.lun]]
    volume = "va"
    size = "1GiB"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:u"
    [tenant.target.chap]
    user = "host2"
    secret = "another secret"
`

// writeSecret writes a secret file as root would (0600); mode and owner are adjusted by the
// caller to test refusals.
func writeSecret(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("secret files must be owned by root: run this test as root (make test does)")
	}
}

func chapConfig(t *testing.T) (dir, doc string) {
	dir = t.TempDir()
	writeSecret(t, dir, "disc.secret", "discovery secret\n")
	writeSecret(t, dir, "mutual.secret", "mutual-pass-9876")
	return dir, strings.ReplaceAll(chapDoc, "/SECRETDIR", dir)
}

func TestCHAPTablesParse(t *testing.T) {
	needRoot(t)
	dir, doc := chapConfig(t)
	cfg, err := Parse(filepath.Join(dir, "x.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	tn := cfg.Tenants[0]
	d := tn.DiscoveryCHAP
	if d == nil || d.User != "disc" || d.Secret.Len() != len("discovery secret") || d.Mutual() {
		t.Fatalf("discovery chap %+v (the trailing newline is not part of the secret)", d)
	}
	if fmt.Sprint(d.Prefs()) != fmt.Sprint([]chap.Algorithm{chap.SHA3_256, chap.SHA256, chap.MD5}) {
		t.Fatalf("discovery inherits the tenant's algorithms: %v", d.Prefs())
	}
	c := tn.Targets[0].CHAP
	if c == nil || c.User != "host1" || c.Secret.Len() != 12 || !c.Mutual() || c.MutualUser != "iqn.2026-11.io.example:t" ||
		c.MutualSecret.Len() != len("mutual-pass-9876") || len(c.Algorithms) != 1 || c.Algorithms[0] != chap.SHA256 {
		t.Fatalf("target chap %+v", c)
	}
	if u := tn.Targets[1].CHAP; u == nil || u.Mutual() || len(u.Algorithms) != 3 {
		t.Fatalf("second target chap %+v", u)
	}
	if strings.Contains(fmt.Sprintf("%+v %#v", *c, cfg), "0123456789ab") {
		t.Fatal("the configuration prints a secret")
	}
}

func TestCHAPValidationErrorsNameFileLineAndKeyButNeverTheSecret(t *testing.T) {
	needRoot(t)
	cases := []struct {
		name     string
		from, to string
		line     int
		key      string
		inMsg    string
	}{
		{"short inline secret", `secret = "0123456789ab"`, `secret = "short-pw"`, 11, "tenant[0].target[0].chap.secret", "at least 12"},
		{"both secret and file", `secret = "0123456789ab"`, `secret = "0123456789ab"
    secret_file = "disc.secret"`, 12, "tenant[0].target[0].chap.secret_file", "not both"},
		{"no secret", `    secret = "0123456789ab"` + "\n", "", 9, "tenant[0].target[0].chap", `missing required key "secret"`},
		{"no user", `    user = "host1"` + "\n", "", 9, "tenant[0].target[0].chap", `missing required key "user"`},
		{"unknown algorithm", `algorithms = ["SHA-256"]`, `algorithms = ["SHA-512"]`, 14, "tenant[0].target[0].chap.algorithms", "unknown CHAP algorithm"},
		{"empty algorithms", `algorithms = ["SHA-256"]`, `algorithms = []`, 14, "tenant[0].target[0].chap.algorithms", "at least one"},
		{"algorithm twice", `algorithms = ["SHA-256"]`, `algorithms = ["SHA-256", "sha-256"]`, 14, "tenant[0].target[0].chap.algorithms", "twice"},
		{"tenant algorithm unknown", `chap_algorithms = ["SHA3-256", "sha256", "MD5"]`, `chap_algorithms = ["MD4"]`, 3, "tenant[0].chap_algorithms", "unknown CHAP algorithm"},
		{"mutual user without secret", `    mutual_secret_file = "/SECRETDIR/mutual.secret"` + "\n", "", 12, "tenant[0].target[0].chap.mutual_user", "needs mutual_secret"},
		{"mutual secret without user", `    mutual_user = "iqn.2026-11.io.example:t"` + "\n", "", 12, "tenant[0].target[0].chap.mutual_secret_file", "needs mutual_user"},
		{"same secret both ways", `mutual_secret_file = "/SECRETDIR/mutual.secret"`, `mutual_secret = "0123456789ab"`, 13, "tenant[0].target[0].chap.mutual_secret", "must differ"},
		{"unknown key", `algorithms = ["SHA-256"]`, `algorithm = ["SHA-256"]`, 14, "tenant[0].target[0].chap.algorithm", "unknown key"},
		{"missing file", `secret_file = "disc.secret"`, `secret_file = "nope.secret"`, 6, "tenant[0].discovery_chap.secret_file", "no such file"},
		{"user with control char", `user = "disc"`, `user = "di\u0001sc"`, 5, "tenant[0].discovery_chap.user", "control character"},
		{"chap not a table", `    [tenant.target.chap]
    user = "host2"
    secret = "another secret"`, `    chap = "yes"`, 20, "tenant[0].target[1].chap", "must be a table"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir, doc := chapConfig(t)
			from := strings.ReplaceAll(c.from, "/SECRETDIR", dir)
			if !strings.Contains(doc, from) {
				t.Fatalf("test bug: %q not in the document", from)
			}
			doc = strings.Replace(doc, from, c.to, 1)
			_, err := Parse(filepath.Join(dir, "x.toml"), []byte(doc))
			wantError(t, err, filepath.Join(dir, "x.toml"), c.line, c.key, c.inMsg)
			for _, s := range []string{"0123456789ab", "short-pw", "discovery secret", "mutual-pass-9876"} {
				if strings.Contains(err.Error(), s) {
					t.Fatalf("error shows a secret: %v", err)
				}
			}
		})
	}
}

func wantError(t *testing.T, err error, file string, line int, key, inMsg string) {
	t.Helper()
	if err == nil {
		t.Fatal("accepted")
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("error %T %v is not Errors", err, err)
	}
	want := fmt.Sprintf("%s:%d: %s: ", file, line, key)
	for _, e := range es {
		if strings.HasPrefix(e.Error(), want) && strings.Contains(e.Msg, inMsg) {
			return
		}
	}
	t.Fatalf("want an error starting %q containing %q, got:\n%v", want, inMsg, err)
}

func TestSecretFileMustBeRootOwnedAndPrivate(t *testing.T) {
	needRoot(t)
	cases := []struct {
		name  string
		mode  os.FileMode
		uid   int
		body  string
		inMsg string
	}{
		{"group-readable", 0o640, 0, "discovery secret", "group and others must have no access"},
		{"world-readable", 0o604, 0, "discovery secret", "group and others must have no access"},
		{"group-writable", 0o620, 0, "discovery secret", "group and others must have no access"},
		{"not root's", 0o600, 1000, "discovery secret", "owned by root"},
		{"too short", 0o600, 0, "short\n", "at least 12"},
		{"too long", 0o600, 0, strings.Repeat("x", maxSecretFile+1), "longer than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir, doc := chapConfig(t)
			p := writeSecret(t, dir, "disc.secret", c.body)
			if err := os.Chmod(p, c.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(p, c.uid, 0); err != nil {
				t.Fatal(err)
			}
			_, err := Parse(filepath.Join(dir, "x.toml"), []byte(doc))
			wantError(t, err, filepath.Join(dir, "x.toml"), 6, "tenant[0].discovery_chap.secret_file", c.inMsg)
		})
	}
	// A directory or a symlink to a private root file: only the file's own rules matter.
	dir, doc := chapConfig(t)
	if err := os.Symlink(filepath.Join(dir, "mutual.secret"), filepath.Join(dir, "link.secret")); err != nil {
		t.Fatal(err)
	}
	if _, err := Parse(filepath.Join(dir, "x.toml"), []byte(strings.Replace(doc, "disc.secret", "link.secret", 1))); err != nil {
		t.Fatalf("symlink to a private root file: %v", err)
	}
	if err := os.Mkdir(filepath.Join(dir, "d.secret"), 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := Parse(filepath.Join(dir, "x.toml"), []byte(strings.Replace(doc, "disc.secret", "d.secret", 1)))
	wantError(t, err, filepath.Join(dir, "x.toml"), 6, "tenant[0].discovery_chap.secret_file", "not a regular file")
}

func TestSyntaxErrorInASecretDoesNotQuoteIt(t *testing.T) {
	for _, line := range []string{`secret = SUPERSECRET-VALUE`, `mutual_secret = SUPERSECRET-VALUE`, `secret = "SUPERSECRET\q"`} {
		doc := "[[tenant]]\nname = \"a\"\n  [tenant.discovery_chap]\n  user = \"u\"\n  " + line + "\n"
		_, err := Parse("x.toml", []byte(doc))
		if err == nil || strings.Contains(err.Error(), "SUPERSECRET") || !strings.Contains(err.Error(), "x.toml:5:") {
			t.Fatalf("%s: %v", line, err)
		}
		var es Errors
		if !errors.As(err, &es) {
			t.Fatalf("%T is not Errors", err)
		}
		for _, e := range es {
			if e.Err != nil && strings.Contains(e.Err.Error(), "SUPERSECRET") {
				t.Fatalf("the wrapped error quotes the secret: %v", e.Err)
			}
		}
	}
}
