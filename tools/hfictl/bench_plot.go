package main

// bench --plot: bandwidth and latency against message size for every path,
// op and buffer kind of a run, next to memcpy, drawn with gonum/plot.

import (
	"fmt"
	"image/color"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// plotFormat is the canvas format of a plot file, by its extension.
func plotFormat(file string) (string, error) {
	switch ext := strings.ToLower(filepath.Ext(file)); ext {
	case ".svg", ".png":
		return ext[1:], nil
	}
	return "", usageErr("--plot %q: want a .svg or .png file", file)
}

// opColors: one colour per op, memcpy black.
var opColors = map[string]color.Color{
	"write":    color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	"read":     color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	"send":     color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	"expected": color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	"memcpy":   color.Black,
}

// pathDashes: the first path solid, the next dashed, ...
var pathDashes = [][]vg.Length{nil, {vg.Points(6), vg.Points(3)}, {vg.Points(2), vg.Points(2)}, {vg.Points(8), vg.Points(2), vg.Points(2), vg.Points(2)}}

// memGlyphs: a glyph shape per buffer kind.
var memGlyphs = map[string]draw.GlyphDrawer{"anon": draw.CircleGlyph{}, "memfd": draw.BoxGlyph{}}

// sizeTicks marks every power of two of the size axis, labelled every
// eighth (8B, 64B, 512B, 4KiB, ...).
type sizeTicks struct{}

func (sizeTicks) Ticks(lo, hi float64) []plot.Tick {
	var t []plot.Tick
	for e := int(math.Floor(math.Log2(lo))); e <= int(math.Ceil(math.Log2(hi))); e++ {
		v := math.Ldexp(1, e)
		if v < lo || v > hi {
			continue
		}
		label := ""
		if e%3 == 0 && e >= 0 {
			label = sizeLabel(int(v))
		}
		t = append(t, plot.Tick{Value: v, Label: label})
	}
	return t
}

// writePlot draws the rows into file: bandwidth (GB/s) on the left,
// latency p50 (us) on the right, both against size on log scales, one line
// per path, op and buffer kind, and memcpy (the median over the rows of a
// size, as measured in the same run).
func writePlot(file string, rows []perfRow) (err error) {
	format, err := plotFormat(file)
	if err != nil {
		return err
	}
	bw := newLogPlot("Bandwidth", "GB/s")
	lat := newLogPlot("Latency (p50)", "us")
	type key struct{ path, op, mem, mode, wait string }
	series := map[key]plotter.XYs{}
	var keys []key
	memcpy := map[string]map[int][]float64{"bw": {}, "lat": {}}
	paths := []string{}
	for _, r := range rows {
		k := key{r.path, r.op, r.mem, r.mode, r.wait}
		if _, ok := series[k]; !ok {
			keys = append(keys, k)
		}
		if !slices.Contains(paths, r.path) {
			paths = append(paths, r.path)
		}
		y, cp := r.bw/1e9, r.memcpyBW/1e9
		if r.mode == "lat" {
			y, cp = r.p50.Seconds()*1e6, r.memcpyP50.Seconds()*1e6
		}
		if y > 0 {
			series[k] = append(series[k], plotter.XY{X: float64(r.size), Y: y})
		}
		if cp > 0 {
			memcpy[r.mode][r.size] = append(memcpy[r.mode][r.size], cp)
		}
	}
	// One legend for both plots, beside them: the lines cover the plots.
	legend := plot.NewLegend()
	legend.Top, legend.Left = true, true
	legend.TextStyle.Font.Size = vg.Points(8)
	named := map[string]bool{}
	add := func(p *plot.Plot, name string, xys plotter.XYs, c color.Color, dashes []vg.Length, g draw.GlyphDrawer, width vg.Length) error {
		if len(xys) == 0 {
			return nil
		}
		l, s, err := plotter.NewLinePoints(xys)
		if err != nil {
			return fmt.Errorf("plot %s: %w", name, err)
		}
		l.Color, l.Dashes, l.Width = c, dashes, width
		s.Color, s.Shape, s.Radius = c, g, vg.Points(2)
		p.Add(l, s)
		if !named[name] {
			named[name] = true
			legend.Add(name, l, s)
		}
		return nil
	}
	for _, k := range keys {
		p := bw
		if k.mode == "lat" {
			p = lat
		}
		name := k.op + " " + k.mem
		if k.wait == "event" {
			name += " (event)"
		}
		if len(paths) > 1 {
			name = k.path + " " + name
		}
		dash := pathDashes[slices.Index(paths, k.path)%len(pathDashes)]
		if err := add(p, name, series[k], opColors[k.op], dash, memGlyphs[k.mem], vg.Points(1.2)); err != nil {
			return err
		}
	}
	for mode, p := range map[string]*plot.Plot{"bw": bw, "lat": lat} {
		var xys plotter.XYs
		for _, size := range slices.Sorted(maps.Keys(memcpy[mode])) {
			v := memcpy[mode][size]
			slices.Sort(v)
			xys = append(xys, plotter.XY{X: float64(size), Y: v[len(v)/2]})
		}
		if err := add(p, "memcpy", xys, opColors["memcpy"], nil, draw.CrossGlyph{}, vg.Points(2)); err != nil {
			return err
		}
		fitLog(p)
	}
	w, h, lw := 36*vg.Centimeter, 16*vg.Centimeter, 7*vg.Centimeter
	c, err := draw.NewFormattedCanvas(w, h, format)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	dc := draw.New(c)
	legend.Draw(draw.Crop(dc, w-lw+vg.Centimeter/2, 0, 0, -vg.Centimeter))
	plots := [][]*plot.Plot{{bw, lat}}
	for i, row := range plot.Align(plots, draw.Tiles{Rows: 1, Cols: 2, PadX: vg.Centimeter}, draw.Crop(dc, 0, -lw, 0, 0)) {
		for j, dc := range row {
			plots[i][j].Draw(dc)
		}
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer cleanup(&err, "closing the plot", f.Close)
	if _, err := c.WriteTo(f); err != nil {
		return fmt.Errorf("writing %s: %w", file, err)
	}
	return nil
}

func newLogPlot(title, unit string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "message size"
	p.Y.Label.Text = unit
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	p.X.Tick.Marker = sizeTicks{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Add(plotter.NewGrid())
	return p
}

// fitLog sets the axes to the data with some room, and to a decade when
// there is one value (a log scale needs lo < hi, both positive).
func fitLog(p *plot.Plot) {
	for _, a := range []*plot.Axis{&p.X, &p.Y} {
		if a.Min <= 0 || a.Max <= 0 || math.IsInf(a.Min, 0) || math.IsInf(a.Max, 0) {
			a.Min, a.Max = 1, 10
		}
		a.Min, a.Max = a.Min/1.5, a.Max*1.5
	}
}
