// Draws the ```mermaid blocks with the mermaid script this site serves itself (no CDN), so the
// diagrams render offline; the SVG goes into the page, where text search and printing see it.
document.addEventListener("DOMContentLoaded", () => {
  mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });
  mermaid.run({ querySelector: ".diagram" });
});
