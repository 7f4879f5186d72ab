"""A test-only custom node pack the tests' server loads beside Shield: conditioning for the family
fixtures (no text encoders). Not part of Shield; never shipped."""

from comfy_api.v0_0_2 import ComfyExtension, io

from .conditioning import fabricated_conditioning


class ShieldTestFabricatedConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldTestFabricatedConditioning",
            display_name="Fabricated Conditioning (Shield tests)",
            category="shield_tests",
            description="Seeded tensors shaped like the model family's text-encoder output.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose conditioning shapes are fabricated."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the tensors."),
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Number of text tokens."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model, seed, tokens) -> io.NodeOutput:
        return io.NodeOutput(fabricated_conditioning(model, seed, tokens))


class FamilyTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ShieldTestFabricatedConditioning]


async def comfy_entrypoint() -> FamilyTestExtension:
    return FamilyTestExtension()
