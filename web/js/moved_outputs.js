// Graphs saved on another ComfyUI version: a node whose outputs moved between versions (the stock
// TrainLoraNode's `lora` is output 1 in ComfyUI 0.3.x and output 0 later) arrives with its links
// on the wrong output, and the page would queue a MODEL where a LORA_MODEL belongs. After a graph
// loads, every link whose two ends disagree on the type is moved to the one output of its source
// node that has the type the input takes; a link with no such output, or several, is left alone.
import { app } from "../../scripts/app.js";

function types(type) {
  return String(type ?? "").split(",").map((t) => t.trim()).filter(Boolean);
}

export function compatible(outputType, inputType) {
  const outs = types(outputType), ins = types(inputType);
  if (!outs.length || !ins.length || outs.includes("*") || ins.includes("*")) return true;
  return outs.some((t) => ins.includes(t));
}

/** Moves links whose ends disagree on their type; returns what it moved. */
export function repairMovedOutputs(graph) {
  const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
  const moved = [];
  for (const link of links) {
    if (!link) continue;
    const origin = graph.getNodeById(link.origin_id), target = graph.getNodeById(link.target_id);
    const output = origin?.outputs?.[link.origin_slot], input = target?.inputs?.[link.target_slot];
    if (!output || !input || compatible(output.type, input.type)) continue;
    const fitting = origin.outputs.flatMap((o, slot) => (compatible(o.type, input.type) &&
      types(o.type).length ? [slot] : []));
    if (fitting.length !== 1) continue;
    const targetSlot = link.target_slot;
    origin.connect(fitting[0], target, targetSlot);
    moved.push({ node: origin.type, from: link.origin_slot, to: fitting[0], target: target.type, input: input.name });
  }
  for (const m of moved) {
    console.info(`Sparse Atoms: ${m.node} output ${m.from} -> ${m.to} for ${m.target}.${m.input} (outputs moved between ComfyUI versions)`);
  }
  return moved;
}

app.registerExtension({
  name: "SparseAtoms.MovedOutputs",
  async afterConfigureGraph() {
    repairMovedOutputs(app.graph);
  },
});
