package bench

import (
	"fmt"
	"html"
	"io"
	"math"
)

// seriesColor gives each system a fixed colour; limits are hatched grey.
var seriesColor = map[string]string{
	SysContainerd:       "#7f7f7f",
	SysEstargz:          "#cbc9e2",
	SysEstargzOpt:       "#6a51a3",
	SysStarlight:        "#9ecae1",
	SysStarlightTrace:   "#3182bd",
	SysLimit:            "#31a354",
	SysContainerdUpdate: "#bdbdbd",
	SysStarlightUpdate:  "#e6550d",
	SysLimitUpdate:      "#a1d99b",
}

// writeSVG draws one panel per profile; in each, a group of bars per image
// (one bar per system, log-scale seconds), as in the NSDI'22 paper's
// figure of provisioning times.
func (r *Result) writeSVG(w io.Writer, rows []Row) error {
	systems := r.systems()
	images := r.Images()
	const (
		barW, gap, left, top, panelH, panelGap = 11.0, 18.0, 60.0, 58.0, 220.0, 60.0
	)
	groupW := float64(len(systems))*barW + gap
	width := left + float64(len(images))*groupW + 20
	if width < 640 {
		width = 640
	}
	height := top + float64(len(r.Profiles))*(panelH+panelGap) + 50
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, row := range rows {
		if row.Seconds > 0 && !math.IsNaN(row.Seconds) {
			lo, hi = math.Min(lo, row.Seconds), math.Max(hi, row.Seconds)
		}
	}
	if math.IsInf(lo, 0) {
		lo, hi = 0.1, 10
	}
	dLo, dHi := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if dHi <= dLo {
		dHi = dLo + 1
	}
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="11">`+"\n", width, height)
	p(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	p(`<text x="%.0f" y="20" font-size="14" font-weight="bold">Time to ready (s, log scale), median of %d runs — %s</text>`+"\n",
		left, r.Runs, html.EscapeString(r.Started.UTC().Format("2006-01-02")))
	for pi, prof := range r.Profiles {
		y0 := top + float64(pi)*(panelH+panelGap)
		yOf := func(s float64) float64 {
			return y0 + panelH - (math.Log10(s)-dLo)/(dHi-dLo)*panelH
		}
		p(`<text x="%.0f" y="%.0f" font-weight="bold">%s (%s)</text>`+"\n", left, y0-6, html.EscapeString(prof.Name), html.EscapeString(prof.Profile.String()))
		for d := dLo; d <= dHi; d++ {
			y := yOf(math.Pow(10, d))
			p(`<line x1="%.0f" x2="%.0f" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, width-10, y, y)
			p(`<text x="%.0f" y="%.1f" text-anchor="end">%g</text>`+"\n", left-4, y+4, math.Pow(10, d))
		}
		for ii, img := range images {
			x0 := left + float64(ii)*groupW + gap/2
			for si, sys := range systems {
				for _, row := range rows {
					if row.Image != img || row.Profile != prof.Name || row.System != sys || !(row.Seconds > 0) {
						continue
					}
					x := x0 + float64(si)*barW
					y := yOf(row.Seconds)
					p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" stroke="#333" stroke-width="0.4"><title>%s %s %s: %.2fs</title></rect>`+"\n",
						x, y, barW-1, y0+panelH-y, seriesColor[sys], html.EscapeString(img), html.EscapeString(prof.Name), sys, row.Seconds)
				}
			}
			p(`<text x="%.1f" y="%.0f" text-anchor="middle">%s</text>`+"\n", x0+float64(len(systems))*barW/2, y0+panelH+14, html.EscapeString(img))
		}
		p(`<line x1="%.0f" x2="%.0f" y1="%.0f" y2="%.0f" stroke="#333"/>`+"\n", left, width-10, y0+panelH, y0+panelH)
	}
	ly := height - 50
	x := left
	for _, sys := range systems {
		if w := 13 + float64(len(sys))*6.5; x+w > width-10 {
			x, ly = left, ly+18 // wrap the legend
		}
		p(`<rect x="%.0f" y="%.0f" width="10" height="10" fill="%s" stroke="#333" stroke-width="0.4"/><text x="%.0f" y="%.0f">%s</text>`+"\n",
			x, ly, seriesColor[sys], x+13, ly+9, sys)
		x += 13 + float64(len(sys))*6.5 + 12
	}
	p("</svg>\n")
	return nil
}
