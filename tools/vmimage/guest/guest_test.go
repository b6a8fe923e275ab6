package guest

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestEncodeParseRoundTrip(t *testing.T) {
	var con bytes.Buffer
	con.WriteString("[    0.000000] Linux version 6.12\nSeaBIOS noise\r\n")
	if err := Encode(&con, MarkerInit, InitInfo{Uptime: 2.3, Release: "6.12.107", Modules: map[string]string{"vfio": ""}}); err != nil {
		t.Fatal(err)
	}
	con.WriteString("\n" + MarkerBegin + "\r\n")
	results := []Result{
		{Name: "a.test", Duration: time.Second, Output: "=== RUN TestX\nGOHFI-FACT kernel=6.12\n    GOHFI-FACT uffd=ok\n--- PASS\n"},
		{Name: "b.test", ExitCode: 1, Output: "FAIL\n"},
	}
	for _, r := range results {
		if err := Encode(&con, MarkerResult, r); err != nil {
			t.Fatal(err)
		}
		con.WriteString("[   3.1] a kernel line between results\n")
	}
	con.WriteString("\n" + MarkerEnd + "2\n" + MarkerPoweroff + "\n")

	rep, err := Parse(&con)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Complete || rep.Init == nil || rep.Init.Release != "6.12.107" || len(rep.Results) != 2 {
		t.Fatalf("report %+v", rep)
	}
	if !rep.Results[0].Passed() || rep.Results[1].Passed() {
		t.Errorf("Passed: %v %v", rep.Results[0].Passed(), rep.Results[1].Passed())
	}
	f := rep.Results[0].Facts()
	if f["kernel"] != "6.12" || f["uffd"] != "ok" || len(f) != 2 {
		t.Errorf("facts %v", f)
	}
}

func TestParseIncomplete(t *testing.T) {
	con := MarkerBegin + "\n" + MarkerResult + `{"name":"a"}` + "\n" + MarkerEnd + "3\n"
	rep, err := Parse(strings.NewReader(con))
	if err == nil || rep.Complete {
		t.Fatalf("a short result list was accepted: %+v, %v", rep, err)
	}
	rep, err = Parse(strings.NewReader(MarkerError + "reading config: no such file\n"))
	if err == nil || rep.Error == "" {
		t.Fatalf("init error not reported: %+v, %v", rep, err)
	}
	rep, err = Parse(strings.NewReader(MarkerResult + "{broken\n"))
	if err == nil {
		t.Fatal("broken JSON accepted")
	}
	// A console that just stops (guest killed) is not complete.
	rep, err = Parse(strings.NewReader("[ 1.0] booting\n"))
	if err != nil || rep.Complete {
		t.Fatalf("%+v, %v", rep, err)
	}
}
